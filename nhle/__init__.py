"""nhle: Negative-Hot Label Encoding unlearning with class weight masking."""
