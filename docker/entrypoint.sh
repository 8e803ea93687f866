#!/bin/sh
# Container entrypoint of the Strongroom image.
#
#   (no arguments) or serve [OPTIONS]: on first start create what the configuration needs
#       and does not have yet - the local KEK (into the keys volume), the keyring and the
#       audit key, each said on stdout; then exec `strongroom serve`, so the proxy is PID 1
#       and gets `docker stop`'s SIGTERM itself.
#   any other strongroom command (keys show -c ..., audit verify ...): run it as is.
#
# $STRONGROOM_CONFIG names the configuration (default /etc/strongroom/strongroom.yaml).
set -eu

config="${STRONGROOM_CONFIG:-/etc/strongroom/strongroom.yaml}"

if [ "$#" -gt 0 ]; then
    case "$1" in
        serve) shift ;;
        -*) ;;
        *) exec strongroom "$@" ;;
    esac
fi

python -m proxy.bootstrap --config "$config"
exec strongroom serve --config "$config" "$@"
