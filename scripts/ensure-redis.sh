#!/usr/bin/env bash
# Makes sure a Redis answers at REDIS_URL's host:port (default 127.0.0.1:6379):
# starts a local redis-server (no persistence, daemonised) when none does.
# The engine tests and the demo publish there.
set -euo pipefail
url="${REDIS_URL:-redis://127.0.0.1:6379}"
hostport="${url#redis://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"
[ "$port" = "$hostport" ] && port=6379
ping() { (exec 3<>"/dev/tcp/$host/$port" && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG) 2>/dev/null; }
if ping; then echo "redis: answering at $host:$port"; exit 0; fi
if [ "$host" != "127.0.0.1" ] && [ "$host" != "localhost" ]; then
  echo "redis: nothing answers at $host:$port (REDIS_URL=$url) and it is not local" >&2; exit 1
fi
if ! command -v redis-server >/dev/null; then
  echo "redis: installing redis-server (Debian package)" >&2
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q redis-server >/dev/null; else sudo apt-get install -y -q redis-server >/dev/null; fi
fi
redis-server --port "$port" --save "" --appendonly no --daemonize yes >/dev/null
for _ in $(seq 50); do ping && { echo "redis: started on port $port"; exit 0; }; sleep 0.1; done
echo "redis: redis-server did not answer on port $port" >&2; exit 1
