//! Certificate rotation without a restart (issue 30), against a real mosquitto that names each
//! client by its certificate's CN (`use_identity_as_username`) and trusts two client CAs: the
//! client certificate and key are replaced in place, the connection is cut (a proxy resets it),
//! and the next connection presents the new certificate; replaced by files that do not parse,
//! the bridge keeps the last good ones, says so once and counts it.

mod common;

use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::{Bridge, BrokerOpts, Mosquitto};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

/// A client CA, and a client certificate it signs with common name `cn`, valid until `year`:
/// (CA PEM, certificate PEM, key PEM).
fn client_pki(ca_name: &str, cn: &str, year: i32) -> (String, String, String) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, cn);
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    leaf.not_after = rcgen::date_time_ymd(year, 1, 1);
    let cert = leaf.signed_by(&key, &ca).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// Waits until the broker's log says a client connected as `id` with user name `user`.
fn wait_connected_as(broker: &Mosquitto, user: &str, after: usize) {
    let needle = format!("u'{user}'");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = broker.log();
        if log[after.min(log.len())..].contains(&needle) {
            return;
        }
        assert!(Instant::now() < deadline, "no connection as {user}:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status_row(admin: &str) -> serde_json::Value {
    let (_, body) = common::http_get(&format!("http://{admin}/api/v1/brokers"), None);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    rows.into_iter().next().unwrap()
}

#[test]
fn a_client_certificate_replaced_in_place_is_used_by_the_next_connection() {
    let tmp = common::tempdir();
    let certs = common::Certs::generate(&tmp.path().join("certs"));
    let (ca_old, crt_old, key_old) = client_pki("old CA", "bridge-old", 2030);
    let (ca_new, crt_new, key_new) = client_pki("new CA", "bridge-new", 2031);
    let bundle = tmp.path().join("client-cas.crt");
    std::fs::write(&bundle, format!("{ca_old}{ca_new}")).unwrap();
    let broker = Mosquitto::start(
        tmp.path(),
        "b1",
        &certs,
        BrokerOpts {
            client_ca: Some(bundle.display().to_string()),
            tls_listener_conf: "use_identity_as_username true",
            ..Default::default()
        },
    );
    let proxy = Proxy::start(broker.tls_port);
    let (crt, key) = (tmp.path().join("client.crt"), tmp.path().join("client.key"));
    std::fs::write(&crt, &crt_old).unwrap();
    std::fs::write(&key, &key_old).unwrap();
    let admin = format!("127.0.0.1:{}", common::free_port());
    let cfg = format!(
        "[bridge]\nid = \"mesh\"\nadmin_listen = \"{admin}\"\ndata_dir = \"{}\"\n\n[tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n[[broker]]\nname = \"b1\"\naddress = \"127.0.0.1:{}\"\n",
        tmp.path().join("data").display(),
        certs.path("ca.crt"),
        crt.display(),
        key.display(),
        proxy.port,
    );
    let bridge = Bridge::start(&tmp.path().join("bridge"), &cfg);
    bridge.wait_subscribed(&["b1"]);
    wait_connected_as(&broker, "bridge-old", 0);
    assert!(
        status_row(&admin)["client_cert_expires"]
            .as_str()
            .unwrap()
            .starts_with("2030-01-01"),
        "{}",
        status_row(&admin)
    );

    // Renewed in place (a new CA the broker also trusts), then the connection is cut.
    let mark = broker.log().len();
    std::fs::write(&crt, &crt_new).unwrap();
    std::fs::write(&key, &key_new).unwrap();
    proxy.reset();
    wait_connected_as(&broker, "bridge-new", mark);
    assert!(bridge.wait_log(
        "TLS files changed: the next connections use them",
        1,
        Duration::from_secs(5)
    ));
    let row = status_row(&admin);
    assert!(
        row["client_cert_expires"]
            .as_str()
            .unwrap()
            .starts_with("2031-01-01"),
        "{row}"
    );
    let metrics = common::http_get(&format!("http://{admin}/metrics"), None).1;
    assert!(
        metrics
            .contains("meshbridge_client_cert_expiry_timestamp_seconds{broker=\"b1\"} 1924992000"),
        "{metrics}"
    );

    // Files that do not parse: the last good ones stay, said once, counted.
    let mark = broker.log().len();
    std::fs::write(&crt, "not a certificate").unwrap();
    proxy.reset();
    wait_connected_as(&broker, "bridge-new", mark);
    assert!(bridge.wait_log(
        "cannot be used: the connections keep the previous ones",
        1,
        Duration::from_secs(5)
    ));
    assert_eq!(status_row(&admin)["tls_reload_failures"], 1);
}
