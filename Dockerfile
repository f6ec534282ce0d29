# The tcpnetlock server.
#
#   docker build -t tcpnetlock .
#   docker run --rm -p 7654:7654 tcpnetlock
#
# Configure it with TCPNETLOCK_* variables (docker run -e ...), as listed by server.ts --help.
FROM denoland/deno:2.9.6

WORKDIR /app
COPY . .

# Everything the server and its health check import, fetched now: the container needs no network
# to start, and runs with --cached-only. As the deno user, who owns DENO_DIR (/deno-dir).
USER deno
RUN deno cache --frozen server.ts client.ts lib/client_cli.ts do.ts

# Listen on every IPv4 address of the container; the health check's client reads the same port.
ENV TCPNETLOCK_LISTEN=0.0.0.0 \
    TCPNETLOCK_PORT=7654 \
    DENO_NO_UPDATE_CHECK=1
EXPOSE 7654

# .ping over plain TCP needs no auth token. With TLS (--tls-cert), replace it: use
# --http-listen and /healthz, or "client.ts --tls --ca-cert FILE ping".
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
  CMD ["deno", "run", "--cached-only", "--allow-net", "--allow-env", "client.ts", "ping"]

# The image's entrypoint (tini) runs deno and passes SIGTERM on; the server then closes every
# connection, which frees every lock, and exits 0. --max-semi-space-size=8 keeps V8's young
# generation at 8 MB per half: by default it grows with the machine's memory while thousands of
# connections arrive, and stays (docs/server.md, "Memory").
CMD ["deno", "run", "--cached-only", "--v8-flags=--max-semi-space-size=8", "--allow-net", "--allow-env", "--allow-read", "--allow-write", "--allow-sys", "server.ts", "--info"]
