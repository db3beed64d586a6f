# Training on an NVIDIA GPU, as in the article: the project on TensorFlow's GPU image.
#   docker build -f docker/train.Dockerfile -t flowers-train .
#   docker run --gpus all -e MLFLOW_TRACKING_URI=http://<tracking server>:5000 flowers-train \
#     backbone=tfhub_inception_v3_inaturalist
# Track to a server (make ui serves one) so runs and artifacts land outside the container. The core installs no
# TensorFlow of its own (no cpu or gpu extra): tf-keras asks for tensorflow 2.21, and the image's GPU build is it.
# The postgres extra lets the same image run the team tracking server and search workers (compose.yaml).
FROM tensorflow/tensorflow:2.21.0-gpu

WORKDIR /app
COPY . .
RUN pip install --no-cache-dir -c constraints.txt -e ".[postgres]"
ENTRYPOINT ["python", "train.py"]
