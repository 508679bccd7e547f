"""The nhle model server (installed as nhle_serving): ONNX Runtime behind FastAPI, following the
MLflow registry's champion. Never imports torch: `pip install 'nhle[serve]'` is all it needs.

    uvicorn nhle_serving.server:create_app --factory --http nhle_serving.http:GuardedProtocol \
        --host 127.0.0.1 --port 8000
"""
