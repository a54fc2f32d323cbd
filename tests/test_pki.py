"""fedwire.pki: key file modes, certificate contents, CRL numbering, and real TLS handshakes through Python's ssl."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedwire import pki

TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Leaf:
    cert: Path
    key: Path
    serial: int


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _client(ca: pki.CertificateAuthority, directory: Path, name: str) -> Leaf:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    serial = pki.issue_client_certificate(ca, common_name=name, cert_path=cert, key_path=key)
    return Leaf(cert, key, serial)


def _server(ca: pki.CertificateAuthority, directory: Path, hosts: list[str]) -> Leaf:
    cert, key = directory / "server.pem", directory / "server.key"
    pki.issue_server_certificate(ca, cert_path=cert, key_path=key, hosts=hosts)
    return Leaf(cert, key, pki.certificate_serial(cert))


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _crl(path: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(path.read_bytes())


# --- files and modes ---------------------------------------------------------------------------------------------


def test_key_files_are_private_and_certificates_public_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)  # a restrictive umask must not hide the certificates from Mosquitto's user
    try:
        ca = pki.create_ca(tmp_path / "ca")
        client, server = _client(ca, tmp_path, "d07"), _server(ca, tmp_path, [])
        pki.write_crl(ca, revoked_serials=[], path=tmp_path / "crl.pem")
    finally:
        os.umask(old)
    for key in (ca.key_path, client.key, server.key):
        assert _mode(key) == 0o600, key
    for public in (ca.cert_path, client.cert, server.cert, tmp_path / "crl.pem"):
        assert _mode(public) == 0o644, public
    assert ca.cert_path == tmp_path / "ca" / "ca.pem" and ca.key_path == tmp_path / "ca" / "ca.key"


def test_private_keys_are_0600_from_creation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Key material goes only into files created 0600 (never created open, then chmod'ed: an early open would keep
    its access), whether written in place (ca.key) or through a temporary file (mkstemp goes through os.open too)."""
    created: dict[int, int] = {}  # fd -> mode it was created with
    seen: list[tuple[int, int]] = []  # (creation mode, mode at the time of writing) of every write of a key
    real_open, real_write = os.open, os.write

    def recording_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kwargs: object) -> int:
        fd = real_open(path, flags, mode, **kwargs)  # type: ignore[arg-type]
        if flags & os.O_CREAT:
            created[fd] = mode
        return fd

    def checked_write(fd: int, data: bytes | memoryview) -> int:
        if b"PRIVATE KEY" in bytes(data):
            seen.append((created.get(fd, -1), stat.S_IMODE(os.fstat(fd).st_mode)))
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "write", checked_write)
    old = os.umask(0)  # with no umask to mask it, a permissive creation mode would show
    try:
        ca = pki.create_ca(tmp_path)
        _client(ca, tmp_path, "d01")
        _server(ca, tmp_path, [])
    finally:
        os.umask(old)
    assert seen == [(0o600, 0o600)] * 3


def test_create_ca_refuses_to_replace_an_existing_ca(tmp_path: Path) -> None:
    ca = pki.create_ca(tmp_path)
    before = (ca.cert_path.read_bytes(), ca.key_path.read_bytes())
    with pytest.raises(FileExistsError):
        pki.create_ca(tmp_path)
    ca.cert_path.unlink()  # a key alone is still somebody's CA
    with pytest.raises(FileExistsError):
        pki.create_ca(tmp_path)
    assert ca.key_path.read_bytes() == before[1]


def test_ensure_ca_creates_once_then_returns_the_same_ca(tmp_path: Path) -> None:
    first = pki.ensure_ca(tmp_path / "ca")
    cert_bytes = first.cert_path.read_bytes()
    second = pki.ensure_ca(tmp_path / "ca")
    assert second == first
    assert second.cert_path.read_bytes() == cert_bytes
    assert pki.load_ca(tmp_path / "ca") == first


def test_load_ca_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ca\.pem"):
        pki.load_ca(tmp_path)
    ca = pki.create_ca(tmp_path)
    ca.key_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"ca\.key"):
        pki.load_ca(tmp_path)


# --- certificate contents ----------------------------------------------------------------------------------------


def test_ca_certificate_is_a_self_signed_ca_for_leaves_only(tmp_path: Path) -> None:
    cert = _load(pki.create_ca(tmp_path, name="Test CA").cert_path)
    cert.verify_directly_issued_by(cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert pki.certificate_common_name(pki.load_ca(tmp_path).cert_path) == "Test CA"


def test_client_certificate_is_signed_by_the_ca_for_client_auth(tmp_path: Path) -> None:
    ca = pki.create_ca(tmp_path)
    client = _client(ca, tmp_path, "d07")
    cert, ca_cert = _load(client.cert), _load(ca.cert_path)
    cert.verify_directly_issued_by(ca_cert)
    assert pki.certificate_common_name(client.cert) == "d07"
    assert pki.certificate_serial(client.cert) == client.serial == cert.serial_number
    assert client.serial != _client(ca, tmp_path, "d08").serial
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.not_valid_before_utc < ca_cert.not_valid_after_utc  # sanity: issued within the CA's life


def test_client_certificate_from_another_ca_does_not_verify(tmp_path: Path) -> None:
    ca, other = pki.create_ca(tmp_path / "a"), pki.create_ca(tmp_path / "b")
    stranger = _client(other, tmp_path, "d07")
    with pytest.raises(InvalidSignature):  # same CA name, different key
        _load(stranger.cert).verify_directly_issued_by(_load(ca.cert_path))


def test_server_certificate_names_its_hosts_and_loopback(tmp_path: Path) -> None:
    ca = pki.create_ca(tmp_path)
    server = _server(ca, tmp_path, ["broker.lan", "192.168.1.20", "fd00::1", "localhost"])
    cert = _load(server.cert)
    cert.verify_directly_issued_by(_load(ca.cert_path))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.lan", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.168.1.20"),
        ipaddress.ip_address("fd00::1"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]


# --- the CRL -----------------------------------------------------------------------------------------------------


def test_empty_crl_is_written_and_signed_by_the_ca(tmp_path: Path) -> None:
    ca = pki.create_ca(tmp_path)
    path = tmp_path / "crl.pem"
    pki.write_crl(ca, revoked_serials=[], path=path)
    crl = _crl(path)
    assert len(crl) == 0
    assert crl.is_signature_valid(ca.private_key().public_key())
    assert crl.issuer == _load(ca.cert_path).subject
    assert crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)


def test_rewriting_the_crl_grows_its_number_and_lists_what_was_passed(tmp_path: Path) -> None:
    ca = pki.create_ca(tmp_path)
    path = tmp_path / "crl.pem"
    a, b, c = (_client(ca, tmp_path, name).serial for name in ("d01", "d02", "d03"))
    pki.write_crl(ca, revoked_serials=[a], path=path)
    first = _crl(path)
    pki.write_crl(ca, revoked_serials=iter([a, b, c, b]), path=path)  # any iterable; repeats listed once
    second = _crl(path)

    def number(crl: x509.CertificateRevocationList) -> int:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    assert number(second) > number(first)
    assert {r.serial_number for r in first} == {a}
    assert sorted(r.serial_number for r in second) == sorted({a, b, c})
    assert second.is_signature_valid(ca.private_key().public_key())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp file left behind


# --- real TLS handshakes -----------------------------------------------------------------------------------------


@dataclass
class Handshake:
    server_error: BaseException | None
    client_error: BaseException | None
    reply: bytes


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str) -> Handshake:
    """Connect over loopback TCP; the server answers b"ok" only after it accepted the client's certificate.

    With TLS 1.3 the client's handshake completes before the server has judged the client certificate, so
    only the reply (or the server's own error) tells whether the server accepted it.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT_S)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT_S)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except BaseException as error:  # recorded for the test to assert on
            errors.append(error)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_error: BaseException | None = None
    reply = b""
    try:
        with (
            socket.create_connection(listener.getsockname(), timeout=TIMEOUT_S) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            reply = tls.recv(2)
    except OSError as error:
        client_error = error
    finally:
        thread.join(TIMEOUT_S)
        listener.close()
    assert not thread.is_alive(), "server thread hung"
    return Handshake(errors[0] if errors else None, client_error, reply)


@dataclass(frozen=True)
class Pki:
    ca: pki.CertificateAuthority
    server: Leaf
    server_ctx: Callable[..., ssl.SSLContext]
    client_ctx: Callable[[Leaf], ssl.SSLContext]


@pytest.fixture
def tls(tmp_path: Path) -> Pki:
    ca = pki.create_ca(tmp_path / "ca")
    server = _server(ca, tmp_path, ["broker.lan", "10.1.2.3"])

    def server_ctx(crl: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13 clients verify strictly by default
        ctx.load_cert_chain(server.cert, server.key)
        ctx.load_verify_locations(cafile=ca.cert_path)
        ctx.verify_mode = ssl.CERT_REQUIRED
        if crl is not None:
            ctx.load_verify_locations(cafile=crl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return ctx

    def client_ctx(client: Leaf) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        ctx.load_verify_locations(cafile=ca.cert_path)
        ctx.load_cert_chain(client.cert, client.key)
        return ctx

    return Pki(ca, server, server_ctx, client_ctx)


def _accepted(result: Handshake) -> bool:
    return result.server_error is None and result.client_error is None and result.reply == b"ok"


def _verify_code(error: BaseException | None) -> int | None:
    return error.verify_code if isinstance(error, ssl.SSLCertVerificationError) else None


@pytest.mark.parametrize("server_hostname", ["127.0.0.1", "localhost", "broker.lan", "10.1.2.3"])
def test_handshake_succeeds_with_a_good_client_certificate(tls: Pki, tmp_path: Path, server_hostname: str) -> None:
    client = _client(tls.ca, tmp_path, "d07")
    result = _handshake(tls.server_ctx(), tls.client_ctx(client), server_hostname)
    assert _accepted(result), result


def test_client_rejects_a_host_the_server_certificate_does_not_name(tls: Pki, tmp_path: Path) -> None:
    client = _client(tls.ca, tmp_path, "d07")
    result = _handshake(tls.server_ctx(), tls.client_ctx(client), "elsewhere.lan")
    assert isinstance(result.client_error, ssl.SSLCertVerificationError), result
    assert "mismatch" in result.client_error.verify_message.lower(), result.client_error
    assert result.reply == b""


def test_handshake_fails_with_a_client_certificate_from_another_ca(tls: Pki, tmp_path: Path) -> None:
    stranger = _client(pki.create_ca(tmp_path / "other"), tmp_path, "d07")
    client_ctx = tls.client_ctx(stranger)
    result = _handshake(tls.server_ctx(), client_ctx, "127.0.0.1")
    assert not _accepted(result) and result.reply == b""
    # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY: both CAs are named alike, but the authority key id tells
    # OpenSSL the stranger's issuer is not the CA it knows (without it: 7, a signature failure against ours).
    assert _verify_code(result.server_error) == 20, result


def test_handshake_fails_with_a_revoked_client_certificate_once_the_crl_is_loaded(tls: Pki, tmp_path: Path) -> None:
    revoked, kept = _client(tls.ca, tmp_path, "d07"), _client(tls.ca, tmp_path, "d08")
    assert _accepted(_handshake(tls.server_ctx(), tls.client_ctx(revoked), "127.0.0.1"))  # fine before the CRL
    crl = tmp_path / "crl.pem"
    pki.write_crl(tls.ca, revoked_serials=[revoked.serial], path=crl)

    result = _handshake(tls.server_ctx(crl), tls.client_ctx(revoked), "127.0.0.1")
    assert not _accepted(result) and result.reply == b""
    assert _verify_code(result.server_error) == 23, result  # X509_V_ERR_CERT_REVOKED, not a CRL it could not use
    # The same CRL lets a certificate it does not list through, so OpenSSL found and accepted the CRL itself.
    assert _accepted(_handshake(tls.server_ctx(crl), tls.client_ctx(kept), "127.0.0.1"))


def test_an_empty_crl_satisfies_crl_checking(tls: Pki, tmp_path: Path) -> None:
    client = _client(tls.ca, tmp_path, "d07")
    crl = tmp_path / "crl.pem"
    pki.write_crl(tls.ca, revoked_serials=[], path=crl)
    assert _accepted(_handshake(tls.server_ctx(crl), tls.client_ctx(client), "127.0.0.1"))
    # Without any CRL for the CA, CRL checking refuses every client (X509_V_ERR_UNABLE_TO_GET_CRL).
    no_crl = tls.server_ctx()
    no_crl.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    assert _verify_code(_handshake(no_crl, tls.client_ctx(client), "127.0.0.1").server_error) == 3
