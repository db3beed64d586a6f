"""Transfer-learning flower classifiers: data -> backbone -> model -> train -> evaluate -> export -> track."""

import os

# TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notices) hides the progress bars; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
