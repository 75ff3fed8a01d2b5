use super::*;

fn none() -> TransportOptions {
    TransportOptions::default()
}

fn direct(url: &str) -> Vec<urls::Node> {
    match Endpoint::parse(url, &none()).unwrap().target {
        Target::Direct(nodes) => nodes,
        other => panic!("{other:?}"),
    }
}

fn err(url: &str, options: &TransportOptions) -> String {
    Endpoint::parse(url, options).unwrap_err().to_string()
}

#[test]
fn plain_urls_keep_their_user_password_and_database() {
    let n = &direct("redis://celeriac:s%40cret@cache.internal:6380/3")[0];
    assert_eq!(n.info.addr, ConnectionAddr::Tcp("cache.internal".into(), 6380));
    assert_eq!(n.info.redis.username.as_deref(), Some("celeriac"));
    assert_eq!(n.info.redis.password.as_deref(), Some("s@cret"));
    assert_eq!(n.info.redis.db, 3);
    assert!(n.tls.is_none());
    // A password alone is the default user's, as redis-py sends it.
    let n = &direct("redis://:pw@localhost")[0];
    assert_eq!(
        (n.info.redis.username.as_deref(), n.info.redis.password.as_deref()),
        (None, Some("pw"))
    );
    assert_eq!(n.info.addr, ConnectionAddr::Tcp("localhost".into(), 6379));
    assert_eq!(direct("valkey://h/2")[0].info.redis.db, 2);
}

#[test]
fn rediss_verifies_unless_told_otherwise() {
    let n = &direct("rediss://h:6380/0")[0];
    let tls = n.tls.as_ref().unwrap();
    assert_eq!((tls.verify.clone(), tls.explicit), (Verify::Full, false));
    assert!(matches!(n.info.addr, ConnectionAddr::TcpTls { .. }));
    for (query, verify) in [
        ("ssl_cert_reqs=none", Verify::Nothing),
        ("ssl_cert_reqs=CERT_NONE", Verify::Nothing),
        ("ssl_cert_reqs=required", Verify::Full),
        ("ssl_cert_reqs=CERT_OPTIONAL", Verify::Full),
        ("ssl_cert_reqs=required&ssl_check_hostname=false", Verify::AnyHostname),
    ] {
        let n = &direct(&format!("rediss://h/0?{query}"))[0];
        assert_eq!(n.tls.as_ref().unwrap().verify, verify, "{query}");
    }
    assert!(err("rediss://h/0?ssl_cert_reqs=maybe", &none()).contains("ssl_cert_reqs=maybe"));
    assert!(err("redis://h/0?ssl_cert_reqs=required", &none()).contains("rediss://"));
}

#[test]
fn certificate_files_are_read_up_front_and_named_when_missing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "CA").unwrap();
    let both = dir.path().join("client.pem");
    std::fs::write(&both, "CERT+KEY").unwrap();
    let url = format!("rediss://h/0?ssl_ca_certs={}&ssl_certfile={}", ca.display(), both.display());
    let tls = direct(&url)[0].tls.clone().unwrap();
    assert_eq!(tls.ca.as_deref(), Some(&b"CA"[..]));
    assert_eq!(tls.client, Some((b"CERT+KEY".to_vec(), b"CERT+KEY".to_vec())));
    assert!(tls.explicit);
    let e = err("rediss://h/0?ssl_ca_certs=/nonexistent/ca.pem", &none());
    assert!(e.contains("ssl_ca_certs=/nonexistent/ca.pem: cannot read it"), "{e}");
    assert!(err("rediss://h/0?ssl_keyfile=/k", &none()).contains("ssl_keyfile needs ssl_certfile"));
}

#[test]
fn socket_urls_take_kombus_virtual_host() {
    let n = &direct("redis+socket:///run/redis/redis.sock?virtual_host=2")[0];
    assert_eq!(n.info.addr, ConnectionAddr::Unix("/run/redis/redis.sock".into()));
    assert_eq!(n.info.redis.db, 2);
    assert_eq!(direct("socket:///tmp/r.sock")[0].info.redis.db, 0);
    assert_eq!(
        direct("redis+unix:///tmp/r.sock?db=5&pass=x")[0].info.redis.password.as_deref(),
        Some("x")
    );
    assert!(err("redis+socket://", &none()).contains("needs a path"));
}

#[test]
fn failover_lists_keep_their_order() {
    let nodes = direct("redis://a:6379/1; redis://b:6380/1;");
    let addrs: Vec<_> = nodes.iter().map(|n| address(&n.info)).collect();
    assert_eq!(addrs, ["a:6379", "b:6380"]);
}

#[test]
fn sentinel_urls_need_a_master_name_and_take_the_first_hosts_login() {
    let e = err("sentinel://h1:26379;sentinel://h2:26379", &none());
    assert!(e.contains("master_name"), "{e}");
    let options: TransportOptions = serde_json::from_str(
        r#"{"master_name": "mymaster", "sentinel_kwargs": {"password": "sp"}, "min_other_sentinels": 1,
            "visibility_timeout": 3600}"#,
    )
    .unwrap();
    assert_eq!(options.ignored(), ["visibility_timeout"]);
    let endpoint = Endpoint::parse("sentinel://app:pw@h1/4;sentinel://h2:26380", &options).unwrap();
    assert_eq!(endpoint.db(), 4);
    let Target::Sentinel(spec) = endpoint.target else { panic!() };
    assert_eq!(spec.master_name, "mymaster");
    assert_eq!(spec.min_other_sentinels, 1);
    assert_eq!(
        (spec.master.username.as_deref(), spec.master.password.as_deref()),
        (Some("app"), Some("pw"))
    );
    let sentinels: Vec<_> = spec.sentinels.iter().map(|n| address(&n.info)).collect();
    assert_eq!(sentinels, ["h1:26379", "h2:26380"]);
    assert_eq!(spec.sentinels[1].info.redis.password.as_deref(), Some("sp"));
    assert!(spec.master_tls.is_none());
    let e = err("sentinel://h1;redis://h2", &options);
    assert!(e.contains("mixes"), "{e}");
    let e = err("redis://h1", &options);
    assert!(e.contains("not sentinel://"), "{e}");
}

#[test]
fn cluster_and_unknown_schemes_are_refused_with_the_reason() {
    let e = err("redis+cluster://h:7000", &none());
    assert!(e.contains("Redis Cluster is not supported") && e.contains("Sentinel"), "{e}");
    let e = err("amqp://guest:guest@h//", &none());
    assert!(e.contains("unknown scheme amqp://") && e.contains("guest:**@"), "{e}");
}

#[test]
fn masked_urls_hide_every_password() {
    assert_eq!(masked_url("redis://u:p@h:1/0"), "redis://u:**@h:1/0");
    assert_eq!(masked_url("redis://:p@h"), "redis://:**@h");
    assert_eq!(masked_url("redis://h/0"), "redis://h/0");
    assert_eq!(
        masked_url("sentinel://:a@h1:26379;sentinel://:b@h2:26379"),
        "sentinel://:**@h1:26379;sentinel://:**@h2:26379"
    );
    assert_eq!(masked_url("redis+unix:///s.sock?db=1&pass=x"), "redis+unix:///s.sock?db=1&pass=**");
    assert_eq!(
        masked_url("rediss://u:p@h/0?ssl_cert_reqs=none"),
        "rediss://u:**@h/0?ssl_cert_reqs=none"
    );
}
