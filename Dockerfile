# privseg server image. Installs from pyproject.toml exactly as the README does.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PRIVSEG_HOME=/var/lib/privseg \
    PRIVSEG_KEYSET=/run/keys/keyset.json \
    PRIVSEG_POLICY_DIR=/app/policies

WORKDIR /app
COPY pyproject.toml README.md ./
COPY privseg ./privseg
COPY policies ./policies
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /var/lib/privseg --create-home privseg

# Keys are mounted read-only at run time and never baked into the image. The keyset is mode 0600 (privseg
# refuses anything looser), so the container user must own it: either give it to uid 10001 on the host
# (sudo chown 10001 keys/keyset.json) or run the container as the file's owner (--user "$(id -u)"):
#   docker run -v "$PWD/keys:/run/keys:ro" -v privseg-data:/var/lib/privseg -p 8000:8000 privseg
# Create API keys with the same image: docker run ... privseg privseg apikey create --role admin --name ops
USER privseg
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["privseg", "serve", "--host", "0.0.0.0", "--port", "8000"]
