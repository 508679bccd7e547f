"""`nhle bench ...`: unlearning (NHLE against retraining, baselines and ablations), report
(several settings in one goal table), scaling, inference, serving and gpu. Each writes its
results to files; docs/benchmarks.md says what they measured."""
