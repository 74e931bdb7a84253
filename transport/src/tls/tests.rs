use super::*;
use std::net::{TcpListener, TcpStream};

fn creds(dir: &Path, host: &str) -> Credentials {
    Credentials::load(&dir.join(host), None).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("livemig-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn client(c: &Credentials, name: &str) -> SourceSecurity {
    SourceSecurity::Mtls {
        config: c.client_config().unwrap(),
        server_name: ServerName::try_from(name.to_string()).unwrap(),
    }
}

/// Runs a handshake between `src` and `dst` over loopback; returns both ends' results.
fn handshake(src: SourceSecurity, dst: DestSecurity) -> (Result<Conn, TlsError>, Result<Conn, TlsError>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::scope(|s| {
        let server = s.spawn(move || accept(l.accept().unwrap().0, &dst, Duration::from_secs(5)));
        let c = connect(TcpStream::connect(addr).unwrap(), &src, Duration::from_secs(5));
        let srv = server.join().unwrap();
        (c, srv)
    })
}

#[test]
fn mutual_tls_authenticates_both_ends_and_seals_both_directions() {
    let d = tmp("ok");
    init(&d, &["src", "dst"]).unwrap();
    let (src, dst) = (creds(&d, "src"), creds(&d, "dst"));
    assert_eq!(src.sole_peer_name().as_deref(), Some("dst"));
    let (c, s) = handshake(client(&src, "dst"), DestSecurity::Mtls(dst.server_config().unwrap()));
    let (c, s) = (c.unwrap(), s.unwrap());
    assert_eq!((c.info().peer.as_deref(), s.info().peer.as_deref()), (Some("CN=dst"), Some("CN=src")));
    assert_eq!(c.binding(), s.binding(), "both ends export the same binding secret");
    (&c).write_all(b"to the destination").unwrap();
    (&s).write_all(b"to the source").unwrap();
    let mut buf = [0u8; 18];
    (&s).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"to the destination");
    let mut buf = [0u8; 13];
    (&c).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"to the source");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_certificate_from_another_ca_none_or_an_expired_one_is_refused_at_the_handshake() {
    let (d, other, old) = (tmp("d"), tmp("other"), tmp("old"));
    init(&d, &["src", "dst"]).unwrap();
    init(&other, &["src"]).unwrap();
    init_with_validity(&old, &["src"], date_time_ymd(2020, 1, 1), date_time_ymd(2021, 1, 1)).unwrap();
    let dst = DestSecurity::Mtls(creds(&d, "dst").server_config().unwrap());
    // A source whose certificate another CA signed (it trusts the destination's CA, so only its own is wrong).
    let stranger = Credentials::load(&other.join("src"), Some(&d.join("ca.pem"))).unwrap();
    let (c, s) = handshake(client(&stranger, "dst"), dst.clone());
    let s = s.unwrap_err().to_string();
    assert!(s.contains("certificate was refused") && s.contains("UnknownIssuer"), "{s}");
    let c = c.unwrap_err().to_string();
    assert!(c.contains("refused ours"), "{c}");
    // A source with no certificate.
    let mut roots = RootCertStore::empty();
    roots.add(read_certs(&d.join("ca.pem")).unwrap().remove(0)).unwrap();
    let bare = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("dst".to_string()).unwrap();
    let (_, s) = handshake(SourceSecurity::Mtls { config: Arc::new(bare), server_name: name }, dst.clone());
    let s = s.unwrap_err().to_string();
    assert!(s.contains("presented no certificate"), "{s}");
    // An expired certificate (its CA is trusted here).
    let old_src = Credentials::load(&old.join("src"), Some(&d.join("ca.pem"))).unwrap();
    let dst_trusting_old = Credentials::load(&d.join("dst"), Some(&old.join("ca.pem"))).unwrap();
    let (_, s) = handshake(client(&old_src, "dst"), DestSecurity::Mtls(dst_trusting_old.server_config().unwrap()));
    let s = s.unwrap_err().to_string();
    assert!(s.contains("Expired"), "{s}");
    // The destination's certificate must carry the name the source expects.
    let (c, _) = handshake(client(&creds(&d, "src"), "elsewhere"), dst);
    let c = c.unwrap_err().to_string();
    assert!(c.contains("certificate was refused") && c.contains("NotValidForName"), "{c}");
    for x in [d, other, old] {
        std::fs::remove_dir_all(x).unwrap();
    }
}

#[test]
fn plaintext_on_either_side_gets_a_clear_refusal() {
    let d = tmp("plain");
    init(&d, &["src", "dst"]).unwrap();
    // A plaintext source against a TLS destination: the destination says why, in a frame the source can read.
    let dst = DestSecurity::Mtls(creds(&d, "dst").server_config().unwrap());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::scope(|s| {
        let server = s.spawn(|| accept(l.accept().unwrap().0, &dst, Duration::from_secs(5)));
        let mut c = TcpStream::connect(addr).unwrap();
        let _ = crate::wire::write_abort(&mut c, "pretend Hello");
        let mut body = Vec::new();
        let h = crate::wire::read_frame(&mut c, &mut body).unwrap();
        assert_eq!(h.kind, crate::wire::Kind::Abort);
        assert!(crate::wire::decode_reason(&body).contains("requires mutual TLS"));
        let e = server.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("spoke plaintext"), "{e}");
    });
    // A TLS source against a plaintext destination, which answers bad magic with an Abort.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            let (c, _) = l.accept().unwrap();
            let mut body = Vec::new();
            if let Err(e) = crate::wire::read_frame(&mut &c, &mut body) {
                let _ = crate::wire::write_abort(&mut &c, &e.to_string());
            }
        });
        let e = connect(TcpStream::connect(addr).unwrap(), &client(&creds(&d, "src"), "dst"), Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("answered in plaintext") && e.contains("not using TLS"), "{e}");
    });
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_key_others_can_read_is_refused() {
    let d = tmp("perm");
    init(&d, &["src"]).unwrap();
    let key = d.join("src/key.pem");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let e = Credentials::load(&d.join("src"), None).unwrap_err().to_string();
    assert!(e.contains("private key open to users other than its owner (mode 644)") && e.contains("chmod 600"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_link_proof_holds_only_for_its_control_session_and_link() {
    let (control, link, other) = ([1u8; 32], [2u8; 32], [3u8; 32]);
    let proof = link_proof(&control, &link);
    assert!(check_link_proof(&control, &link, &proof));
    assert!(!check_link_proof(&other, &link, &proof), "another session's control secret");
    assert!(!check_link_proof(&control, &other, &proof), "replayed on another link");
}
