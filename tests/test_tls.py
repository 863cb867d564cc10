"""https with certificate verification on: the agent installs from a server whose certificate
chains to the provisioned CA, and refuses one that does not."""
from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mpota import MpotaError, release


def make_ca(name):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(ca_key, ca_cert, host):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


@pytest.fixture
def https_release(tmp_path, firmware, signer):
    root = tmp_path / "rel"
    release.build(firmware("2.0.0"), root, [signer])
    ca_key, ca_cert = make_ca("mpota test CA")
    key, cert = make_leaf(ca_key, ca_cert, "localhost")
    (tmp_path / "srv.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "srv.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield "https://localhost:%d/" % httpd.server_address[1], ca_cert.public_bytes(serialization.Encoding.DER)
    httpd.shutdown()
    httpd.server_close()


def test_https_with_the_provisioned_ca(https_release, firmware, make_device, tmp_path):
    # provisioned the way a user does it: `mpota sim create --ca ca.pem` (PEM converted to DER)
    url, ca_der = https_release
    pem = tmp_path / "ca.pem"
    pem.write_bytes(x509.load_der_x509_certificate(ca_der).public_bytes(serialization.Encoding.PEM))
    d = make_device(firmware("1.0.0"), url, ca=pem)
    assert (d.dev.fs / "ca.der").read_bytes() == ca_der
    d.run()
    st = d.status()
    assert st["version"] == "2.0.0", d.output


def test_https_refuses_a_certificate_from_another_ca(https_release, firmware, make_device, tmp_path):
    url, _ = https_release
    _, other = make_ca("someone else")
    (tmp_path / "other.der").write_bytes(other.public_bytes(serialization.Encoding.DER))
    d = make_device(firmware("1.0.0"), url, ca=tmp_path / "other.der")
    d.run()
    st = d.status()
    assert st["last_error"] == "network" and st["version"] == "1.0.0", d.output
    assert "cannot connect" in st["detail"]


def test_https_without_a_ca_is_refused_by_mpota_and_by_the_device(https_release, firmware, make_device):
    url, _ = https_release
    with pytest.raises(MpotaError) as e:
        make_device(firmware("1.0.0"), url)
    assert "--ca" in e.value.hint
    # a config edited by hand to https, without a CA: the device says so and changes nothing
    d = make_device(firmware("1.0.0"), "http://127.0.0.1:9/")
    d.config(server=url)
    d.run()
    assert d.status()["last_error"] == "bad-config" and d.status()["version"] == "1.0.0"


def test_ca_files_that_are_not_certificates_or_too_big(https_release, firmware, make_device, tmp_path):
    url, ca_der = https_release
    (tmp_path / "junk.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(MpotaError) as e:
        make_device(firmware("1.0.0"), url, ca=tmp_path / "junk.pem")
    assert "not an X.509 certificate" in str(e.value)
    with pytest.raises(MpotaError) as e:
        make_device(firmware("1.0.0"), "http://127.0.0.1:9/", ca=tmp_path / "junk.pem")
    assert "not an X.509" in str(e.value)
    (tmp_path / "ca.der").write_bytes(ca_der)
    with pytest.raises(MpotaError) as e:  # a CA for http servers only is a mistake
        make_device(firmware("1.0.0"), "http://127.0.0.1:9/", ca=tmp_path / "ca.der")
    assert "https" in str(e.value)
    # on the device: a CA file over the bound (a bundle, or garbage) is a config error
    d = make_device(firmware("1.0.0"), url, ca=tmp_path / "ca.der")
    (d.dev.fs / "ca.der").write_bytes(ca_der * (4097 // len(ca_der) + 1))
    d.run()
    st = d.status()
    assert st["last_error"] == "bad-config" and "over 4096" in st["detail"] and st["version"] == "1.0.0"
