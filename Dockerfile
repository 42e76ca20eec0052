# loopstream workers (see docker-compose.yml): the repository installed with the [kafka] extra.
FROM python:3.12-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir '.[kafka]'
# The local projection of the event topic (a cache, rebuilt from Kafka when lost).
ENV LOOPSTREAM_DB=/data/loopstream.db
WORKDIR /data
ENTRYPOINT ["loopstream"]
CMD ["worker", "--role", "all", "--bus", "kafka://kafka:29092"]
