#!/bin/sh
# tests/tls/make_certs.sh OUTDIR
#
# Writes the certificates the TLS tests use into OUTDIR with the openssl
# command line (EC P-256 keys: fast). Nothing here is committed; the tests
# run this script into a fresh temporary directory.
#
#   ca.pem ca.key                the test CA
#   server.pem server.key        signed by the CA; localhost, 127.0.0.1, ::1
#   client.pem client.key        a client certificate signed by the CA
#   other_ca.pem other_ca.key    an unrelated CA
#   other_server.pem/.key        a server certificate of the unrelated CA
#   other_client.pem/.key        a client certificate of the unrelated CA
#   expired.pem expired.key      signed by the CA, valid 2020-2021 only
#   wrongname.pem wrongname.key  signed by the CA for wrong.example only
#   corrupt.pem                  server.pem with damaged base64
#   server_enc.key               server.key encrypted with "hunter2"
set -eu
out=${1:?usage: make_certs.sh OUTDIR}
mkdir -p "$out"
cd "$out"

key() { openssl ecparam -name prime256v1 -genkey -noout -out "$1" 2> /dev/null; }

ca() { # name cn
    key "$1.key"
    openssl req -x509 -new -sha256 -days 3650 -key "$1.key" -subj "/CN=$2" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$1.pem"
}

leaf() { # name ca cn san
    key "$1.key"
    openssl req -new -sha256 -key "$1.key" -subj "/CN=$3" -out "$1.csr"
    printf 'basicConstraints=CA:FALSE\n%s\n' "$4" > "$1.ext"
    openssl x509 -req -sha256 -days 3650 -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" \
        -set_serial "0x$(openssl rand -hex 8)" -extfile "$1.ext" -out "$1.pem" 2> /dev/null
    rm -f "$1.csr" "$1.ext"
}

ca ca "Patio Test CA"
ca other_ca "Unrelated Test CA"
# mbedTLS 2.28 compares a name given as an IP address with the DNS names
# (it has no IP SAN matching), so the addresses appear both ways.
leaf server ca localhost "subjectAltName=DNS:localhost,DNS:127.0.0.1,DNS:::1,IP:127.0.0.1,IP:::1"
leaf client ca "patio test client" ""
leaf other_server other_ca localhost "subjectAltName=DNS:localhost,DNS:127.0.0.1,IP:127.0.0.1"
leaf other_client other_ca "unrelated client" ""
leaf wrongname ca wrong.example "subjectAltName=DNS:wrong.example"

# An expired certificate: `openssl ca` takes explicit start and end dates.
key expired.key
openssl req -new -sha256 -key expired.key -subj "/CN=localhost" -out expired.csr
mkdir -p ca.db
: > ca.db/index.txt
cat > ca.db/ca.cnf <<CNF
[ca]
default_ca = test
[test]
database = ca.db/index.txt
new_certs_dir = ca.db
serial = ca.db/serial
default_md = sha256
policy = any
copy_extensions = none
x509_extensions = ext
unique_subject = no
[any]
commonName = supplied
[ext]
basicConstraints = CA:FALSE
subjectAltName = DNS:localhost,DNS:127.0.0.1,IP:127.0.0.1
CNF
echo 1000 > ca.db/serial
openssl ca -batch -notext -config ca.db/ca.cnf -cert ca.pem -keyfile ca.key \
    -startdate 20200101000000Z -enddate 20210101000000Z \
    -in expired.csr -out expired.pem 2> /dev/null
rm -rf ca.db expired.csr

# A PEM whose base64 body is damaged.
awk 'NR == 3 { gsub(/[A-Za-z]/, "#") } { print }' server.pem > corrupt.pem

openssl ec -in server.key -aes128 -passout pass:hunter2 -out server_enc.key 2> /dev/null
