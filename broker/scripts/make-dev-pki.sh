#!/usr/bin/env bash
# Make a development PKI and credentials for the fedclip-edge mosquitto broker:
#   a CA, a broker certificate (SAN: localhost, 127.0.0.1 and any --host), a mosquitto password
#   file with the `aggregator` account plus one account per device id, the ACL, and a copy of
#   broker/mosquitto/mosquitto.conf whose paths point into the output folder.
#
# Development only: the CA key sits next to everything else. For production use certificates from
# your own CA and keep ca.key off the broker host.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: make-dev-pki.sh [--out DIR] [--host NAME]... [--port N] [--job JOB] [--days N]
                      [--force] [--keys | --no-keys] [--site SITE_ID]... DEVICE_ID...

  DEVICE_ID        one account per device; its username (and MQTT client id) is DEVICE_ID.
                   Letters, digits, '.', '_' and '-' only; 'aggregator' is reserved.
  --out DIR        output folder (default: ./broker-dev)
  --host NAME      extra DNS name or IP address for the broker certificate (repeatable);
                   localhost and 127.0.0.1 are always included
  --port N         the TLS listener's port in DIR/mosquitto.conf (default: 8883); give
                   another for a second broker on the same host (a site and a central)
  --job JOB        pin every account to this one job in the ACL (default: any job name)
  --days N         certificate validity in days (default: 825)
  --force          overwrite an existing PKI in DIR (new CA: every client needs the new ca.crt)
  --keys           also make the Ed25519 signing keys (make-dev-keys.sh); fail if the
                   fedclip-edge command is not found. Default: make them when it is found.
  --no-keys        do not make signing keys
  --site SITE_ID   a site aggregator's account on this (central) broker, like a device's; its
                   public key goes to DIR/keys/sites/ (`aggregate --site-keys`), not to the
                   device registry: a central accepts a site only from --site-keys (repeatable)

Writes DIR/{ca.crt,ca.key,broker.crt,broker.key,passwd,acl,mosquitto.conf}, DIR/data/ and
DIR/credentials/<user>.env (FEDCLIP_MQTT_USERNAME, FEDCLIP_MQTT_PASSWORD, FEDCLIP_MQTT_CA_FILE),
and with keys DIR/keys/ (see make-dev-keys.sh --help: the aggregator's, each device's and the
exporter's key pairs, and the aggregator's device registry DIR/keys/devices/).
Start the broker with:  mosquitto -c DIR/mosquitto.conf
USAGE
}

die() { echo "make-dev-pki.sh: $*" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
template_dir="$(cd "$here/../mosquitto" && pwd)"

out="./broker-dev"
job=""
port=8883
days=825
force=0
keys=auto
hosts=()
devices=()
sites=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a value"; out="$2"; shift 2 ;;
    --out=*) out="${1#*=}"; shift ;;
    --host) [[ $# -ge 2 ]] || die "--host needs a value"; hosts+=("$2"); shift 2 ;;
    --host=*) hosts+=("${1#*=}"); shift ;;
    --port) [[ $# -ge 2 ]] || die "--port needs a value"; port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --job) [[ $# -ge 2 ]] || die "--job needs a value"; job="$2"; shift 2 ;;
    --job=*) job="${1#*=}"; shift ;;
    --days) [[ $# -ge 2 ]] || die "--days needs a value"; days="$2"; shift 2 ;;
    --days=*) days="${1#*=}"; shift ;;
    --force) force=1; shift ;;
    --keys) keys=yes; shift ;;
    --no-keys) keys=no; shift ;;
    --site) [[ $# -ge 2 ]] || die "--site needs a value"; sites+=("$2"); shift 2 ;;
    --site=*) sites+=("${1#*=}"); shift ;;
    --) shift; devices+=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) devices+=("$1"); shift ;;
  esac
done
# A site has an account on this broker like a device's; only its signing key is filed apart.
plain=("${devices[@]}")
devices+=("${sites[@]}")

[[ ${#devices[@]} -gt 0 ]] || { usage >&2; die "give at least one DEVICE_ID"; }
[[ "$days" =~ ^[0-9]+$ ]] || die "--days must be a whole number, got '$days'"
[[ "$port" =~ ^[0-9]+$ ]] && (( port >= 1 && port <= 65535 )) \
  || die "--port must be a TCP port (1-65535), got '$port'"

# Names end up in MQTT topics and ACL patterns: no '/', '+', '#', spaces or ':' (passwd format).
name_re='^[A-Za-z0-9._-]+$'
declare -A seen=()
for d in "${devices[@]}"; do
  [[ "$d" =~ $name_re ]] || die "device id '$d' may use only letters, digits, '.', '_' and '-'"
  [[ "$d" != "aggregator" ]] || die "'aggregator' is the aggregator's account, not a device id"
  [[ "$d" != "exporter" ]] || die "'exporter' is the artifact signing key's id, not a device id"
  [[ -z "${seen[$d]:-}" ]] || die "device id '$d' given twice"
  seen[$d]=1
done
if [[ -n "$job" ]]; then
  [[ "$job" =~ $name_re ]] || die "job '$job' may use only letters, digits, '.', '_' and '-'"
fi
for h in "${hosts[@]}"; do
  [[ "$h" =~ ^[A-Za-z0-9.:-]+$ ]] || die "host '$h' is not a DNS name or IP address"
done

command -v openssl >/dev/null || die "openssl not found"
passwd_bin="$(command -v mosquitto_passwd || true)"
[[ -n "$passwd_bin" ]] || die "mosquitto_passwd not found (Debian/Ubuntu: apt install mosquitto)"

mkdir -p "$out"
out="$(cd "$out" && pwd)"
products=(ca.crt ca.key broker.crt broker.key passwd acl mosquitto.conf credentials)
[[ $keys == no ]] || products+=(keys)
read -r -a keys_cli <<< "${FEDCLIP_EDGE:-fedclip-edge}"
if [[ $keys == auto ]]; then
  if command -v "${keys_cli[0]}" >/dev/null 2>&1; then keys=yes; else keys=skipped; fi
elif [[ $keys == yes ]]; then
  command -v "${keys_cli[0]}" >/dev/null 2>&1 \
    || die "--keys: ${keys_cli[0]} not found (activate the fedclip-edge environment or set FEDCLIP_EDGE)"
fi
if [[ $force -eq 0 ]]; then
  for p in "${products[@]}"; do
    [[ ! -e "$out/$p" ]] || die "$out/$p exists; refusing to overwrite (use --force)"
  done
fi
rm -rf "$out/credentials" "$out/.work"
mkdir -p "$out/credentials" "$out/data" "$out/.work"
chmod 700 "$out/credentials"
work="$out/.work"
trap 'rm -rf "$work"' EXIT
umask 077

# --- CA ---------------------------------------------------------------------------------------
# EC P-256 keys: fast to make, supported by mosquitto, paho (OpenSSL) and embedded TLS stacks.
openssl req -x509 -new -sha256 -days "$days" -nodes \
  -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
  -keyout "$out/ca.key" -out "$out/ca.crt" \
  -subj "/O=fedclip-edge/CN=fedclip-edge development CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -addext "subjectKeyIdentifier=hash" 2>/dev/null

# --- broker certificate -----------------------------------------------------------------------
san="DNS:localhost,IP:127.0.0.1"
cn="localhost"
for h in "${hosts[@]}"; do
  if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san+=",IP:$h"; else san+=",DNS:$h"; cn="$h"; fi
done
cat > "$work/broker.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyAgreement
extendedKeyUsage=serverAuth
subjectAltName=$san
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EXT
openssl req -new -sha256 -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
  -keyout "$out/broker.key" -out "$work/broker.csr" \
  -subj "/O=fedclip-edge/CN=$cn" 2>/dev/null
openssl x509 -req -sha256 -days "$days" -in "$work/broker.csr" \
  -CA "$out/ca.crt" -CAkey "$out/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
  -extfile "$work/broker.ext" -out "$out/broker.crt" 2>/dev/null
chmod 644 "$out/ca.crt" "$out/broker.crt"

# --- accounts ---------------------------------------------------------------------------------
new_password() { openssl rand -base64 24 | tr '+/' '-_' | tr -d '=\n'; }
rm -f "$out/passwd"
: > "$out/passwd"
for user in aggregator "${devices[@]}"; do
  pw="$(new_password)"
  "$passwd_bin" -b "$out/passwd" "$user" "$pw" >/dev/null
  cat > "$out/credentials/$user.env" <<ENV
FEDCLIP_MQTT_USERNAME=$user
FEDCLIP_MQTT_PASSWORD=$pw
FEDCLIP_MQTT_CA_FILE=$out/ca.crt
ENV
done

# --- ACL and configuration --------------------------------------------------------------------
umask 022
if [[ -n "$job" ]]; then
  sed "s#^\(\(pattern\|topic\) [a-z]* fedclip/\)+/#\1$job/#" "$template_dir/acl" > "$out/acl"
else
  cp "$template_dir/acl" "$out/acl"
fi
sed -e "s#/var/lib/mosquitto/fedclip#$out/data#g" \
    -e "s#/etc/mosquitto/fedclip/#$out/#g" \
    -e "s#^listener 8883\$#listener $port#" \
    "$template_dir/mosquitto.conf" > "$out/mosquitto.conf"

# A broker started as root drops to the `mosquitto` user: let it read its key, passwd and acl and
# write its persistence folder.
if [[ $(id -u) -eq 0 ]] && id mosquitto >/dev/null 2>&1; then
  chown mosquitto: "$out/broker.key" "$out/passwd" "$out/data"
fi
chmod 600 "$out/ca.key" "$out/broker.key" "$out/passwd"

# --- signing keys -----------------------------------------------------------------------------
keys_line="signing keys        $out/keys/  (aggregator exporter ${devices[*]}; registry keys/devices/${sites[*]:+, sites keys/sites/})"
if [[ $keys == yes ]]; then
  key_args=()
  [[ $force -eq 0 ]] || key_args=(--force)
  for s in "${sites[@]}"; do key_args+=(--site "$s"); done
  bash "$here/make-dev-keys.sh" --out "$out" "${key_args[@]}" "${plain[@]}" >/dev/null
elif [[ $keys == skipped ]]; then
  keys_line="signing keys        NOT made: ${keys_cli[0]} not found; run $here/make-dev-keys.sh --out $out ${devices[*]}"
  echo "make-dev-pki.sh: warning: ${keys_cli[0]} not found, no signing keys made (see --keys)" >&2
else
  keys_line="signing keys        not made (--no-keys)"
fi

cat <<DONE
development PKI written to $out
  CA certificate      $out/ca.crt   (give this to every client)
  CA key              $out/ca.key   (keep private)
  broker certificate  $out/broker.crt  (SAN: $san)
  broker key          $out/broker.key
  password file       $out/passwd  (aggregator ${devices[*]})
  ACL                 $out/acl  (jobs: ${job:-any})
  configuration       $out/mosquitto.conf  (TLS on port $port)
  persistence         $out/data/
  credentials         $out/credentials/<user>.env
  $keys_line
start the broker:     mosquitto -c $out/mosquitto.conf
DONE
