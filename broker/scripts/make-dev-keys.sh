#!/usr/bin/env bash
# Make the Ed25519 signing keys of a development federation with `fedclip-edge keys new`:
# one key pair for the aggregator and one per device, plus the aggregator's registry of device
# public keys (the folder of who may take part). make-dev-pki.sh calls this; it also runs alone.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: make-dev-keys.sh [--out DIR] [--force] [--site SITE_ID]... DEVICE_ID...

  DEVICE_ID   one key pair per device (key id = device id = MQTT username)
  --out DIR   output folder (default: ./broker-dev); keys go to DIR/keys/
  --force     replace existing keys (every party then needs the new public keys)
  --site ID   a site aggregator's key pair; its public half goes to DIR/keys/sites/, the
              central's `aggregate --site-keys` (repeatable)

Writes DIR/keys/<id>.key (mode 0600) and DIR/keys/<id>.pub for `aggregator`, `exporter` (signs
exported artifacts: `export --sign-key`) and each device, and DIR/keys/devices/<id>.pub: the
device registry the aggregator is given (`aggregate --device-keys DIR/keys/devices/`).
Devices get their own <id>.key, aggregator.pub and exporter.pub. Uses $FEDCLIP_EDGE (a command, default:
fedclip-edge on PATH).
USAGE
}

die() { echo "make-dev-keys.sh: $*" >&2; exit 1; }

out="./broker-dev"
force=()
devices=()
sites=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a value"; out="$2"; shift 2 ;;
    --out=*) out="${1#*=}"; shift ;;
    --force) force=(--force); shift ;;
    --site) [[ $# -ge 2 ]] || die "--site needs a value"; sites+=("$2"); shift 2 ;;
    --site=*) sites+=("${1#*=}"); shift ;;
    --) shift; devices+=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) devices+=("$1"); shift ;;
  esac
done
[[ $(( ${#devices[@]} + ${#sites[@]} )) -gt 0 ]] || { usage >&2; die "give at least one DEVICE_ID"; }
for d in "${devices[@]}" "${sites[@]}"; do
  [[ "$d" != "aggregator" ]] || die "'aggregator' is the aggregator's key, not a device id"
  [[ "$d" != "exporter" ]] || die "'exporter' is the artifact signing key, not a device id"
done

read -r -a cli <<< "${FEDCLIP_EDGE:-fedclip-edge}"
command -v "${cli[0]}" >/dev/null 2>&1 \
  || die "${cli[0]} not found: activate the fedclip-edge environment or set FEDCLIP_EDGE"

mkdir -p "$out/keys"
keys="$(cd "$out/keys" && pwd)"
ids=(--id aggregator --id exporter)
for d in "${devices[@]}"; do ids+=(--id "$d"); done
for s in "${sites[@]}"; do ids+=(--site "$s"); done
"${cli[@]}" keys new --out "$keys" "${ids[@]}" "${force[@]}" >/dev/null

# the registries hold exactly this run's ids (an earlier run's may linger in them)
registry() {  # registry FOLDER ID...: FOLDER/<id>.pub for each ID
  local dir="$keys/$1"; shift
  rm -rf "$dir"
  mkdir -p "$dir"
  for i in "$@"; do cp "$keys/$i.pub" "$dir/$i.pub"; done
}
registry devices "${devices[@]}"
if [[ ${#sites[@]} -gt 0 ]]; then registry sites "${sites[@]}"; else rm -rf "$keys/sites"; fi
chmod 644 "$keys"/*.pub "$keys"/devices/*.pub "$keys"/sites/*.pub 2>/dev/null || true

echo "signing keys written to $keys"
"${cli[@]}" keys show "$keys" | sed 's/^/  /'
echo "  aggregator: $keys/aggregator.key, device registry $keys/devices/"
[[ ${#sites[@]} -eq 0 ]] || echo "  central: site registry $keys/sites/ (aggregate --site-keys); each site signs with $keys/<site>.key"
echo "  exporter: $keys/exporter.key (export --sign-key)"
echo "  each device: $keys/<id>.key, $keys/aggregator.pub and $keys/exporter.pub"
