//! A throw-away PKI for TLS tests.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Scratch;

/// TLS files of a test PKI: a CA and a server certificate for `127.0.0.1` and `localhost`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate of the CA.
    pub ca: PathBuf,
    /// PEM server certificate, signed by the CA.
    pub cert: PathBuf,
    /// PEM private key of the server certificate.
    pub key: PathBuf,
}

/// A throw-away PKI made with the `openssl` CLI: a P-256 CA and a server certificate with the
/// subject alternative names `IP:127.0.0.1` and `DNS:localhost` (rustls checks them).
#[derive(Debug)]
pub struct Pki {
    /// The files (removed with the PKI).
    pub files: TlsFiles,
    _dir: Scratch,
}

impl Pki {
    /// Generates the CA and the server certificate (valid two days).
    pub fn generate() -> Self {
        let dir = Scratch::new("pki");
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir.0)
                .output()
                .expect("the openssl CLI is not installed");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=qosroute test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        openssl(&csr);
        std::fs::write(
            dir.path("server.ext"),
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        // mosquitto started as root reads its files after dropping to the `mosquitto` user.
        readable_by_all(&dir.path("server.key"));
        Pki {
            files: TlsFiles {
                ca: dir.path("ca.pem"),
                cert: dir.path("server.pem"),
                key: dir.path("server.key"),
            },
            _dir: dir,
        }
    }
}

pub(crate) fn readable_by_all(file: &Path) {
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
}
