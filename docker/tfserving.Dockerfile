# TensorFlow Serving for the champion: build it from the folder make export-tfserving writes.
#   make serve-best-tfserving     (= make export-tfserving; docker build ...; docker run ...)
#   curl -d '{"instances": [{"b64": "'"$(base64 -w0 rose.jpg)"'"}]}' http://127.0.0.1:8501/v1/models/flowers:predict
# The tag matches the TensorFlow that exported the model (pyproject.toml, constraints.txt).
FROM tensorflow/serving:2.21.0

COPY . /models/
EXPOSE 8500 8501
ENTRYPOINT ["tensorflow_model_server", "--port=8500", "--rest_api_port=8501", "--model_config_file=/models/models.config", "--file_system_poll_wait_seconds=0"]
