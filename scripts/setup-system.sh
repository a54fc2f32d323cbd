#!/usr/bin/env bash
# System packages the project needs (Debian). It installs packages and does nothing else: no service of the
# user's is started, stopped, disabled or reconfigured, and no process is killed. The project's own brokers
# run on ports it picks and are stopped by PID. Idempotent, and quick when everything is present.
#
#   scripts/setup-system.sh          what `make demo` needs: Mosquitto, its clients, FashionMNIST, and what
#                                    `make native` builds with (g++, Paho MQTT C, msgpack-c, SQLite, OpenSSL headers)
#   scripts/setup-system.sh --test   also what only the tests and the fault bench need: iproute2 and iptables
#                                    (devices in network namespaces), OpenSSH client and server (the ssh
#                                    target's test runs a private sshd), Chromium (the HTML report is rendered),
#                                    Redis (the multi-node test replicates knowledge through a private redis-server)
#
# FEDCACHE_SETUP_REINSTALL="pkg ..." installs those packages again even when present (repairs a broken
# install; the set-up test uses it to take the install path on a machine that has everything).
set -euo pipefail

profile=demo
case "${1:-}" in
  "") ;;
  --test) profile=test ;;
  *) echo "usage: $0 [--test]" >&2; exit 2 ;;
esac

installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = "installed" ]
}

wanted=(mosquitto mosquitto-clients dataset-fashion-mnist)
# The native device (edge_native/, `make native`): a C++17 compiler, the Paho MQTT C client (v5, TLS), msgpack-c, SQLite.
wanted+=(g++ make pkg-config libpaho-mqtt-dev libmsgpack-dev libsqlite3-dev libssl-dev)
[ "$profile" = test ] && wanted+=(iproute2 iptables openssh-client openssh-server chromium redis-server)

need=()
for package in "${wanted[@]}"; do
  installed "$package" || need+=("$package")
done
for package in ${FEDCACHE_SETUP_REINSTALL:-}; do
  [[ " ${need[*]} " == *" $package "* ]] || need+=("$package")
done
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing system packages ($profile): ${need[*]}"
# Debian's mosquitto, openssh-server and redis-server packages start their system services when first installed.
# Set-up starts nothing, so during this one transaction a policy-rc.d (Debian's documented switch, honoured by
# invoke-rc.d and deb-systemd-invoke) answers "not now"; the services' boot-time settings stay Debian's.
# An existing policy-rc.d is the user's: it is left exactly as it is.
policy=/usr/sbin/policy-rc.d
made_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# written by fedcache scripts/setup-system.sh for one apt-get run; removed after it\nexit 101\n' \
    | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  made_policy=1
fi
remove_policy() { [ -z "$made_policy" ] || $SUDO rm -f "$policy"; }
trap remove_policy EXIT
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --reinstall "${need[@]}"
