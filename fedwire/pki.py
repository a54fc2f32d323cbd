"""The project's small certificate authority: CA, broker and device certificates and the CRL for MQTT over TLS."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertificateAuthority",
    "certificate_common_name",
    "certificate_serial",
    "create_ca",
    "ensure_ca",
    "issue_client_certificate",
    "issue_server_certificate",
    "load_ca",
    "write_crl",
]

SKEW = datetime.timedelta(minutes=5)  # certificates and CRLs start in the past so a slow clock still accepts them


@dataclass(frozen=True)
class CertificateAuthority:
    """Where the CA's certificate and key live; they are read on use, so nothing secret is kept in memory."""

    cert_path: Path
    key_path: Path

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{self.key_path} is not an EC private key")
        return key


def _write(path: Path, data: bytes, mode: int, *, exclusive: bool = False) -> None:
    """Write with `mode` from the file's creation (a key is never readable by others, not even briefly).

    `exclusive` refuses an existing file; otherwise a temporary file in the same directory replaces `path`
    atomically, so Mosquitto (re)loading it never sees half a file.
    """
    if exclusive:
        fd, tmp = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), None
    else:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        try:
            os.fchmod(fd, mode)  # os.open's mode is cut by the umask; a public file must still be readable
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        if tmp is not None:
            os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def _new_key(path: Path, *, exclusive: bool = False) -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key, stored unencrypted (PKCS8 PEM) because Mosquitto starts unattended."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write(path, pem, 0o600, exclusive=exclusive)
    return key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    public: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    signer: ec.EllipticCurvePrivateKey,
    valid_days: int,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    """Sign `public` as `subject`; a leaf never outlives its CA (`issuer`; None signs the CA itself)."""
    now = datetime.datetime.now(datetime.UTC)
    not_after = now + datetime.timedelta(days=valid_days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(public)
        .serial_number(x509.random_serial_number())  # random 128 bits: names the certificate in the CRL
        .not_valid_before(now - SKEW)
        .not_valid_after(min(not_after, issuer.not_valid_after_utc) if issuer else not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        # OpenSSL 3 picks the CRL (and, in strict mode, the issuer) by the authority key id.
        .add_extension(
            _authority_key_id(issuer) if issuer else x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
            critical=False,
        )
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _pem(cert: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature, False, False, False, False, key_cert_sign, crl_sign, False, False)


def create_ca(directory: Path, *, name: str = "FedCache project CA", valid_days: int = 3650) -> CertificateAuthority:
    """Create the project's CA in `directory` (ca.pem, ca.key); refuse to replace one, as that orphans every cert."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority(directory / "ca.pem", directory / "ca.key")
    if ca.cert_path.exists():
        raise FileExistsError(f"a CA certificate already exists at {ca.cert_path}")
    key = _new_key(ca.key_path, exclusive=True)  # O_EXCL: of two racing creators only one wins
    ca_only = [x509.BasicConstraints(ca=True, path_length=0), _usage(key_cert_sign=True, crl_sign=True)]
    cert = _certificate(name, key.public_key(), None, key, valid_days, [(ext, True) for ext in ca_only])
    _write(ca.cert_path, _pem(cert), 0o644, exclusive=True)
    return ca


def load_ca(directory: Path) -> CertificateAuthority:
    """The CA already in `directory`, checked to be whole: a certificate and the key that matches it."""
    ca = CertificateAuthority(directory / "ca.pem", directory / "ca.key")
    for path in (ca.cert_path, ca.key_path):
        if not path.is_file():
            raise FileNotFoundError(f"no CA in {directory}: {path.name} is missing (create one with create_ca)")
    if ca.certificate().public_key() != ca.private_key().public_key():
        raise ValueError(f"{ca.key_path} is not the key of {ca.cert_path}")
    return ca


def ensure_ca(directory: Path, *, name: str = "FedCache project CA", valid_days: int = 3650) -> CertificateAuthority:
    """The CA in `directory`, created first if there is none (a half-written one raises rather than being replaced)."""
    if (directory / "ca.pem").exists() or (directory / "ca.key").exists():
        return load_ca(directory)
    return create_ca(directory, name=name, valid_days=valid_days)


def _issue(
    ca: CertificateAuthority, subject: str, paths: tuple[Path, Path], days: int, *extra: x509.ExtensionType
) -> int:
    """A new leaf key and its CA-signed certificate (key written first); returns the certificate's serial."""
    (cert_path, key_path), (ca_cert, ca_key) = paths, (ca.certificate(), ca.private_key())
    public = _new_key(key_path).public_key()
    critical = [x509.BasicConstraints(ca=False, path_length=None), _usage(digital_signature=True)]
    extensions = [(ext, True) for ext in critical] + [(ext, False) for ext in extra]
    cert = _certificate(subject, public, ca_cert, ca_key, days, extensions)
    _write(cert_path, _pem(cert), 0o644)
    return cert.serial_number


def issue_server_certificate(
    ca: CertificateAuthority, *, cert_path: Path, key_path: Path, hosts: Sequence[str], valid_days: int = 825
) -> None:
    """The broker's certificate, valid for `hosts` and always for loopback, where tests and local devices connect."""
    names: dict[x509.GeneralName, None] = {}  # ordered and without repeats
    for host in [*hosts, "127.0.0.1", "localhost"]:
        try:
            names[x509.IPAddress(ipaddress.ip_address(host))] = None
        except ValueError:
            names[x509.DNSName(host.lower())] = None
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    _issue(
        ca, "FedCache MQTT broker", (cert_path, key_path), valid_days, usage, x509.SubjectAlternativeName(list(names))
    )


def issue_client_certificate(
    ca: CertificateAuthority, *, common_name: str, cert_path: Path, key_path: Path, valid_days: int = 825
) -> int:
    """A device's certificate with CN = its id (for Mosquitto's use_identity_as_username); returns its serial."""
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    return _issue(ca, common_name, (cert_path, key_path), valid_days, usage)


def certificate_serial(cert_path: Path) -> int:
    return x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number


def certificate_common_name(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ValueError(f"{cert_path} has no common name")
    value = names[0].value
    return value if isinstance(value, str) else value.decode()


def write_crl(ca: CertificateAuthority, *, revoked_serials: Iterable[int], path: Path, valid_days: int = 3650) -> None:
    """(Re)write the CA's CRL; an empty one too, since Mosquitto refuses to start when its crlfile is missing.

    Its CRLNumber is one more than the file's previous one so verifiers can tell the newer list apart.
    """
    number = 1
    if path.exists():
        old = x509.load_pem_x509_crl(path.read_bytes())
        with contextlib.suppress(x509.ExtensionNotFound):
            number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    ca_cert, ca_key = ca.certificate(), ca.private_key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - SKEW)
        .next_update(now + datetime.timedelta(days=valid_days))
        .add_extension(_authority_key_id(ca_cert), critical=False)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial in sorted(set(revoked_serials)):
        revoked = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - SKEW).build()
        builder = builder.add_revoked_certificate(revoked)
    _write(path, _pem(builder.sign(ca_key, hashes.SHA256())), 0o644)
