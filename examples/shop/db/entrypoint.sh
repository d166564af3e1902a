#!/bin/sh
# PostgreSQL in a kiln instance: initialise the data directory on the volume
# the first time (the password comes from the POSTGRES_PASSWORD secret and
# never touches the image or kiln's state), then run the server on the port
# kiln assigned. kiln stops instances with SIGTERM, which PostgreSQL takes as
# a "smart" shutdown that waits for every client to leave; it is turned into
# a fast shutdown (SIGINT: roll back open transactions, checkpoint, exit).
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    umask 077
    printf '%s\n' "$POSTGRES_PASSWORD" > /tmp/pwfile
    initdb --pgdata="$PGDATA" --username=postgres --pwfile=/tmp/pwfile \
        --auth=scram-sha-256 --encoding=UTF8 --no-locale --no-instructions
    rm -f /tmp/pwfile
fi
postgres -D "$PGDATA" -c config_file=/config/postgresql.conf -c port="$PORT" &
pid=$!
trap 'kill -INT "$pid"' TERM INT
status=0
wait "$pid" || status=$?
# `wait` returns early when a trapped signal arrives: wait for the exit.
while kill -0 "$pid" 2>/dev/null; do wait "$pid" || status=$?; done
exit "$status"
