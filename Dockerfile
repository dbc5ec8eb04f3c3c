# ponte: web (Gunicorn + Flask) and poller under Supervisor, state on the /data volume.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATABASE_PATH=/data/ponte.db \
    LOG_DIR=/data/logs \
    PONTE_NO_VENV=1

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY . .

# Code stays in /app (owned by root, read-only for the service); state lives on the volume.
RUN useradd --create-home --uid 10001 ponte && mkdir -p /data && chown ponte:ponte /data
USER ponte
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"

# ponte_start.py checks the configuration, the port and /data before Supervisor starts (one
# message in Portuguese, exit 2 or 3) and exits 1 when a program gives up, so the platform shows
# the failure. It passes docker stop's SIGTERM on: the poller may need up to 75 s to finish the
# job in progress, so give the container a stop grace period (docker-compose.yml: 110 s).
CMD ["python", "ponte_start.py"]
