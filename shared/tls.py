"""TLS material for the parties' services: a throwaway local PKI, and gRPC credentials loaded with checked errors.

Why here and general: the payment scoring service needs mutual TLS (the payment holder must know the caller is the
lender), and the Flower transport will need the same files, so `make_local_pki` takes any server names and any
number of client names. It is for tests and local runs: one CA signs everything, its key is used in memory and
discarded (to add a client, make a new set), keys are written owner-only. A real deployment uses each party's own
CA.

Why the loaders parse the PEM themselves: gRPC reports a bad certificate or a key that does not match it only when
the first handshake fails, as an opaque core error; `TlsError` names the file at startup instead.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedscore.shared.atomic import write_private
from fedscore.shared.party_home import PartyHome

CA_FILE = "ca.pem"
VALIDITY = dt.timedelta(days=30)  # throwaway material: short enough that a forgotten copy expires


class TlsError(ValueError):
    """TLS material that cannot be used; the message names the file."""


@dataclass(frozen=True)
class LocalPki:
    """Paths of what `make_local_pki` wrote: the CA certificate, the server pair, and one pair per client name."""

    ca: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # name -> (certificate, key)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedscore local PKI"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
           ca_name: x509.Name, *, is_ca: bool = False, names: list[str] | None = None,
           usage: x509.ObjectIdentifier | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(ca_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True))
    if names:
        builder = builder.add_extension(_san(names), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if is_ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    return builder.sign(ca_key, hashes.SHA256())


def _write(path: Path, data: bytes, mode: int) -> Path:
    """Create the file with its final mode from the start, so a key is never readable by others, even briefly."""
    if not write_private(path, data, mode, exclusive=True):
        raise TlsError(f"{path}: already exists; choose an empty folder (nothing was overwritten)")
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_local_pki(out_dir: Path, server_names: list[str] | None = None, clients: list[str] | None = None,
                   server: str = "server") -> LocalPki:
    """Write a throwaway CA (`ca.pem`), `<server>.pem`/`.key` valid for `server_names` (default localhost and
    127.0.0.1) and `<client>.pem`/`.key` per client name (default "lender"). Keys are mode 0600, the folder 0700.
    Refuses to overwrite any file."""
    server_names = server_names or ["localhost", "127.0.0.1"]
    clients = clients if clients is not None else ["lender"]
    if len(set(clients) | {server}) != len(clients) + 1 or any(not c or Path(c).name != c for c in [*clients, server]):
        raise TlsError(f"client and server names must be distinct plain names, got server {server!r}, {clients}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    targets = [CA_FILE, *(f"{n}.{ext}" for n in [server, *clients] for ext in ("pem", "key"))]
    for existing in (out / t for t in targets if (out / t).exists()):
        raise TlsError(f"{existing}: already exists; choose an empty folder (nothing was overwritten)")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("fedscore local CA")
    ca = _issue("fedscore local CA", ca_key, ca_key, ca_name, is_ca=True)
    _write(out / CA_FILE, _cert_pem(ca), 0o644)
    pairs: dict[str, tuple[Path, Path]] = {}
    for name, names, usage in [(server, server_names, ExtendedKeyUsageOID.SERVER_AUTH),
                               *((c, [c], ExtendedKeyUsageOID.CLIENT_AUTH) for c in clients)]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(name, key, ca_key, ca_name, names=names, usage=usage)
        pairs[name] = (_write(out / f"{name}.pem", _cert_pem(cert), 0o644),
                       _write(out / f"{name}.key", _key_pem(key), 0o600))
    server_cert, server_key = pairs.pop(server)
    return LocalPki(ca=out / CA_FILE, server_cert=server_cert, server_key=server_key, clients=pairs)


# ------------------------------------------------------------------------------------------------ loading


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None


def read_certificates(path: Path, what: str) -> bytes:
    """PEM certificate(s) from `path`, checked to parse."""
    data = _read(path, what)
    try:
        if not x509.load_pem_x509_certificates(data):
            raise ValueError("no certificate")
    except ValueError as exc:
        raise TlsError(f"{path}: not a PEM {what} ({exc})") from None
    return data


def read_key_pair(cert_path: Path, key_path: Path, what: str) -> tuple[bytes, bytes]:
    """(certificate PEM, unencrypted private key PEM), checked to parse and to belong together."""
    cert_pem = read_certificates(cert_path, f"{what} certificate")
    key_pem = _read(key_path, f"{what} private key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsError(f"{key_path}: not an unencrypted PEM private key ({exc})") from None
    cert = x509.load_pem_x509_certificates(cert_pem)[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (cert.public_key().public_bytes(serialization.Encoding.DER, public)
            != key.public_key().public_bytes(serialization.Encoding.DER, public)):
        raise TlsError(f"{key_path}: this private key does not belong to the certificate {cert_path}")
    return cert_pem, key_pem


def mutual_tls_server_credentials(cert: Path, key: Path, client_ca: Path):  # -> grpc.ServerCredentials
    """Server credentials that demand a client certificate signed by `client_ca` (mutual TLS)."""
    import grpc

    cert_pem, key_pem = read_key_pair(cert, key, "server")
    ca_pem = read_certificates(client_ca, "client CA certificate")
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True)


def mutual_tls_channel_credentials(server_ca: Path, cert: Path | None = None, key: Path | None = None):
    """Channel credentials trusting `server_ca`, presenting the client pair when given (both or neither)."""
    import grpc

    ca_pem = read_certificates(server_ca, "server CA certificate")
    if (cert is None) != (key is None):
        raise TlsError("a client certificate needs its key and a key its certificate: pass both or neither")
    if cert is None or key is None:
        return grpc.ssl_channel_credentials(root_certificates=ca_pem)
    cert_pem, key_pem = read_key_pair(cert, key, "client")
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)


# ------------------------------------------------------------------------------------------------ SuperNode keys

def _node_auth_key_pair() -> tuple[bytes, bytes]:
    """A fresh SuperNode authentication key pair (private, public) in the format Flower 1.42 reads
    (`flower-supernode --auth-supernode-private-key`, `flwr supernode register PUB`): ECDSA P-384, OpenSSH encoding."""
    key = ec.generate_private_key(ec.SECP384R1())
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                              serialization.NoEncryption()),
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")


def write_node_auth_key(private_path: Path, public_path: Path) -> Path:
    """A fresh SuperNode key pair in a PKI folder (`fedscore pki`), private key 0600. Refuses to overwrite. Returns
    the public key's path. A party home's own key is `node_auth_key`'s."""
    private, public = _node_auth_key_pair()
    _write(private_path, private, 0o600)
    return _write(public_path, public, 0o644)


def node_auth_key(home: Path) -> tuple[Path, Path]:
    """(private, public) SuperNode key paths in a party home, created there on first use. The key identifies the
    party's SuperNode to the SuperLink (only registered keys may join); it is not the X25519 key that seals payloads."""
    party_home = PartyHome(home)  # supernode-auth.key (0600) and supernode-auth.pub, what the coordinator registers
    private, public = party_home.node_auth_key, party_home.node_auth_pub
    if not private.exists():
        private_bytes, public_bytes = _node_auth_key_pair()
        # exclusive: if another process created the key meanwhile, both keep its pair
        if party_home.write_private(private, private_bytes, exclusive=True):
            party_home.write_private(public, public_bytes, 0o644)
    if private.stat().st_mode & 0o077:
        raise TlsError(f"{private}: readable by other users; chmod 600 it (the SuperNode's authentication key)")
    return private, public


def node_key_fingerprint(public_path: Path) -> str:
    """What the two operators compare out of band for a SuperNode key: sha256 of the OpenSSH public key's bytes,
    first 16 hex characters in groups of 4 (the same form as the payload keys' fingerprints)."""
    import base64
    import hashlib

    text = _read(public_path, "SuperNode public key").split()
    try:
        raw = base64.b64decode(text[1], validate=True)
        serialization.load_ssh_public_key(b" ".join(text[:2]))
    except (IndexError, ValueError) as exc:
        raise TlsError(f"{public_path}: not an OpenSSH public key ({exc})") from None
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return " ".join(digest[i:i + 4] for i in range(0, 16, 4))


@dataclass(frozen=True)
class SuperLinkTls:
    """What the SuperLink serves TLS with (`flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`); the
    SuperNodes and `flwr run` trust `ca`."""

    ca: Path
    cert: Path
    key: Path

    def check(self) -> SuperLinkTls:
        read_certificates(self.ca, "CA certificate")
        read_key_pair(self.cert, self.key, "SuperLink")
        return self
