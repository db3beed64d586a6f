# Training on an NVIDIA GPU, as in the article: the project on TensorFlow's GPU image.
#   docker build -f docker/train.Dockerfile -t flowers-train .
#   docker run --gpus all -e MLFLOW_TRACKING_URI=http://<tracking server>:5000 flowers-train \
#     backbone=tfhub_inception_v3_inaturalist
# Track to a server (make ui serves one) so runs and artifacts land outside the container. Its TensorFlow is
# the one requirements.txt pins, so pip keeps the image's GPU build.
FROM tensorflow/tensorflow:2.21.0-gpu

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
ENTRYPOINT ["python", "train.py"]
