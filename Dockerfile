# One image for every entry point: the operator, the publisher, the admin API and
# migrations (the wheel brings every dependency of pyproject.toml, FastAPI and uvicorn
# among them).
#   somabrain-operator                       the Kopf operator
#   somabrain publisher run --tenant T       a tenant's publisher
#   somabrain admin serve                    the admin HTTP API (port 8081)
#   somabrain db upgrade                     schema migrations
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY somabrain ./somabrain
COPY operator ./operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 10001 --no-create-home somabrain
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY migrations /opt/somabrain/migrations
ENV SOMABRAIN_MIGRATIONS_DIR=/opt/somabrain/migrations \
    PYTHONUNBUFFERED=1
USER 10001
ENTRYPOINT []
CMD ["somabrain", "--help"]
