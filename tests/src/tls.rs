//! Certificates for the TLS tests, made with the `openssl` command: a CA, a server certificate
//! for `localhost` and `127.0.0.1` signed by it, a client certificate for mutual TLS, and a
//! second CA that signed nothing the server shows.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The files, in a folder removed when dropped.
pub struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    /// Makes every file (a few hundred milliseconds: EC keys).
    pub fn make() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let certs = Certs { dir };
        certs.ca("ca", "celeriac test CA");
        certs.ca("other-ca", "a CA the server does not use");
        certs.leaf(
            "server",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
        );
        certs.leaf("client", "celeriac", "extendedKeyUsage=clientAuth");
        certs
    }

    /// The path of `name` (`ca.crt`, `server.key`, ...).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn ca(&self, name: &str, cn: &str) {
        openssl(
            self.dir(),
            &[
                "req",
                "-x509",
                "-new",
                "-nodes",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.crt"),
                "-days",
                "3",
                "-subj",
                &format!("/CN={cn}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }

    fn leaf(&self, name: &str, cn: &str, extensions: &str) {
        std::fs::write(self.path(&format!("{name}.ext")), format!("{extensions}\n")).unwrap();
        openssl(
            self.dir(),
            &[
                "req",
                "-new",
                "-nodes",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            self.dir(),
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "3",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}
