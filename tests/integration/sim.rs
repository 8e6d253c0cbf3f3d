//! The simulator is as strict as the reference: every rule answered with the
//! reference's result code, faults that take effect and clear, and hostile
//! input that gets an answer instead of a crash.

use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn signature_checked_with_the_configured_secret() {
    let sim = sim().await;
    let ok = post(
        &sim,
        "getAppToken",
        &envelope("", &rid(1), json!({"appId": APP_ID}), SECRET),
    )
    .await;
    assert_eq!(code(&ok), 0, "{ok}");
    assert_eq!(ok["rsp"]["expiresIn"], 7200);
    let bad = post(
        &sim,
        "getAppToken",
        &envelope("", &rid(2), json!({"appId": APP_ID}), "wrong-secret"),
    )
    .await;
    assert_eq!(code(&bad), 21006);
    let wrong_app = post(
        &sim,
        "getAppToken",
        &envelope("", &rid(3), json!({"appId": "someone-else"}), SECRET),
    )
    .await;
    assert_eq!(code(&wrong_app), 21002);
    let other_hospital = envelope_at(
        "",
        &rid(4),
        json!({"appId": APP_ID}),
        SECRET,
        "99999",
        now(),
    );
    assert_eq!(
        code(&post(&sim, "getAppToken", &other_hospital).await),
        21005
    );
    // A signed field changed after signing.
    let mut tampered = envelope("", &rid(5), json!({"appId": APP_ID}), SECRET);
    tampered["commonIn"]["timestamp"] = Value::String((now() + 1).to_string());
    assert_eq!(code(&post(&sim, "getAppToken", &tampered).await), 21006);
    let st = state(&sim).await;
    assert_eq!(st["calls"]["getAppToken"]["21006"], 2);
    assert_eq!(st["tokensIssued"], 1);
}

#[tokio::test]
async fn a_new_token_revokes_the_old_one() {
    let sim = sim().await;
    let qr = sim.with_state(|s| s.static_code(0)).unwrap();
    let t1 = token(&sim).await;
    let q = |t: &str, n| envelope(t, &rid(n), json!({"qrCodeText": qr}), SECRET);
    assert_eq!(
        code(&post(&sim, "getHealthCardByQRCode", &q(&t1, 10)).await),
        0
    );
    let t2 = token(&sim).await;
    assert_eq!(
        code(&post(&sim, "getHealthCardByQRCode", &q(&t1, 11)).await),
        21004
    );
    assert_eq!(
        code(&post(&sim, "getHealthCardByQRCode", &q(&t2, 12)).await),
        0
    );
    assert_eq!(
        code(&post(&sim, "getHealthCardByQRCode", &q("", 13)).await),
        21001
    );
    assert_eq!(
        code(&post(&sim, "getHealthCardByQRCode", &q("NOT-A-TOKEN", 14)).await),
        21004
    );
    // The token is bound to its hospital.
    let foreign = envelope_at(
        &t2,
        &rid(15),
        json!({"qrCodeText": qr}),
        SECRET,
        "20000",
        now(),
    );
    assert_eq!(
        code(&post(&sim, "getHealthCardByQRCode", &foreign).await),
        21004
    );
    // Expiry on the simulated clock.
    control(&sim, "POST", "/_sim/clock", json!({"advanceS": 7200})).await;
    assert_eq!(
        code(&post(&sim, "getHealthCardByQRCode", &q(&t2, 16)).await),
        21003
    );
}

#[tokio::test]
async fn replayed_request_id_gets_10054_but_a_rejected_one_may_be_retried() {
    let sim = sim().await;
    let t = token(&sim).await;
    let qr = sim.with_state(|s| s.static_code(1)).unwrap();
    let id = rid(20);
    let first = post(
        &sim,
        "reportHISData",
        &envelope(&t, &id, report(&qr), SECRET),
    )
    .await;
    assert_eq!(code(&first), 0, "{first}");
    let again = post(
        &sim,
        "reportHISData",
        &envelope(&t, &id, report(&qr), SECRET),
    )
    .await;
    assert_eq!(code(&again), 10054);
    // Rejected (bad signature) first: the same requestId then succeeds.
    let id2 = rid(21);
    assert_eq!(
        code(&post(&sim, "reportHISData", &envelope(&t, &id2, report(&qr), "x")).await),
        21006
    );
    assert_eq!(
        code(
            &post(
                &sim,
                "reportHISData",
                &envelope(&t, &id2, report(&qr), SECRET)
            )
            .await
        ),
        0
    );
    let st = state(&sim).await;
    assert_eq!(st["uniqueReports"], 2);
    assert_eq!(st["duplicates"], 1);
    // Malformed and oversized requestIds.
    assert_eq!(
        code(
            &post(
                &sim,
                "reportHISData",
                &envelope(&t, "has space", report(&qr), SECRET)
            )
            .await
        ),
        20001
    );
    assert_eq!(
        code(
            &post(
                &sim,
                "reportHISData",
                &envelope(&t, &"A".repeat(513), report(&qr), SECRET)
            )
            .await
        ),
        10037
    );
    // Timestamp far from the platform's clock.
    let old = envelope_at(&t, &rid(22), report(&qr), SECRET, HOSPITAL, now() - 3600);
    assert_eq!(code(&post(&sim, "reportHISData", &old).await), 20002);
}

#[tokio::test]
async fn report_his_data_rules() {
    let sim = sim().await;
    let t = token(&sim).await;
    let qr = sim.with_state(|s| s.static_code(0)).unwrap();
    let mut n = 100;
    let mut check = |patch: Value, want: i64| {
        n += 1;
        let mut r = report(&qr);
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                r.as_object_mut().unwrap().remove(k);
            } else {
                r[k] = v.clone();
            }
        }
        (envelope(&t, &rid(n), r, SECRET), want)
    };
    let cases = vec![
        check(json!({}), 0),
        check(json!({"qrCodeText": null}), 10018), // health card without QR text
        check(json!({"cardType": "01", "qrCodeText": null}), 10013), // ID card without name
        check(json!({"cardType": "01", "name": "测试甲"}), 10014), // ... without ID number
        check(
            json!({"cardType": "01", "name": "测试甲", "idCardNumber": "999999199001010011"}),
            0,
        ),
        check(
            json!({"cardType": "01", "name": "测试甲", "idCard": "999999199001010011"}),
            0,
        ), // the example's spelling
        check(json!({"department": null}), 10042), // 010101 needs a department
        check(json!({"scene": "0101011", "department": ""}), 10042),
        check(json!({"scene": "010105", "department": null}), 0), // payment does not
        check(json!({"time": "2026/11/21 09:30:12"}), 10042),
        check(json!({"time": "2026-11-21T09:30:12"}), 10042),
        check(json!({"scene": "999999"}), 10042),
        check(json!({"cardType": "12"}), 10042),
        check(json!({"cardChannel": "窗口"}), 10042),
        check(json!({"hospitalId": "20000"}), 21005),
        check(json!({"time": null}), 10042),
    ];
    for (i, (env, want)) in cases.into_iter().enumerate() {
        let a = post(&sim, "reportHISData", &env).await;
        assert_eq!(code(&a), want, "case {i}: {a}");
    }
    let st = state(&sim).await;
    assert_eq!(st["reports"].as_array().unwrap().len(), 4);
    assert_eq!(st["reports"][0]["department"], "内科");
    assert_eq!(st["reports"][0]["cardType"], "11");
}

#[tokio::test]
async fn cards_static_dynamic_expired_unknown() {
    let sim = sim().await;
    let t = token(&sim).await;
    let cards: Value = json_of(control(&sim, "GET", "/_sim/cards", json!({})).await).await;
    let static0 = cards[0]["staticCode"].as_str().unwrap().to_owned();
    assert!(static0.ends_with(":1") && static0.len() == 66);
    let get = |qr: &str, n| envelope(&t, &rid(n), json!({"qrCodeText": qr}), SECRET);
    let a = post(&sim, "getHealthCardByQRCode", &get(&static0, 200)).await;
    assert_eq!(code(&a), 0);
    assert_eq!(a["rsp"]["card"]["name"], "测试甲");
    assert_eq!(a["rsp"]["card"]["qrCodeText"], static0);
    let unknown = format!("{}:1", "AB".repeat(32));
    assert_eq!(
        code(&post(&sim, "getHealthCardByQRCode", &get(&unknown, 201)).await),
        -10019
    );
    assert_eq!(
        code(&post(&sim, "getHealthCardByQRCode", &get("hello", 202)).await),
        10020
    );
    assert_eq!(
        code(&post(&sim, "getHealthCardByQRCode", &get("", 203)).await),
        10018
    );

    let dynamic = mint(&sim, 1, Some(60)).await;
    assert!(dynamic.contains(":0:"));
    let verify = |qr: &str, n| {
        envelope(
            &t,
            &rid(n),
            json!({
                "qrCodeText": qr, "terminalId": "WIN-1", "time": ehc_agent::clock::platform_time(now(), ehc_agent::clock::BEIJING),
                "medicalStep": "010101", "useCityCode": "110000", "useCityName": "北京市",
                "hospitalCode": "01", "hospitalName": "医院", "useChannel": "0100"
            }),
            SECRET,
        )
    };
    let v = post(&sim, "verifyQRCode", &verify(&dynamic, 210)).await;
    assert_eq!(code(&v), 0, "{v}");
    assert_eq!(v["rsp"]["name"], "测试乙");
    assert_eq!(v["rsp"]["healthCardId"], cards[1]["cardId"]);
    // verifyQRCode is for dynamic codes only.
    assert_eq!(
        code(&post(&sim, "verifyQRCode", &verify(&static0, 211)).await),
        10020
    );
    let mut missing = verify(&dynamic, 212);
    missing["req"].as_object_mut().unwrap().remove("terminalId");
    let missing = envelope(&t, &rid(212), missing["req"].clone(), SECRET);
    assert_eq!(code(&post(&sim, "verifyQRCode", &missing).await), 10042);
    // Expired after its lifetime on the simulated clock.
    control(&sim, "POST", "/_sim/clock", json!({"advanceS": 61})).await;
    assert_eq!(
        code(&post(&sim, "verifyQRCode", &verify(&dynamic, 213)).await),
        10020
    );
    let forged = format!("{}:0:{}::1", "CD".repeat(32), "0".repeat(32));
    assert_eq!(
        code(&post(&sim, "verifyQRCode", &verify(&forged, 214)).await),
        -10019
    );
    assert_eq!(
        state(&sim).await["verifications"].as_array().unwrap().len(),
        1
    );
}

#[tokio::test]
async fn bind_card_relation() {
    let sim = sim().await;
    let t = token(&sim).await;
    let qr = sim.with_state(|s| s.static_code(2)).unwrap();
    let b = |req: Value, n| envelope(&t, &rid(n), req, SECRET);
    assert_eq!(
        code(&post(&sim, "bindCardRelation", &b(json!({"qrCodeText": qr}), 300)).await),
        10033
    );
    assert_eq!(
        code(&post(&sim, "bindCardRelation", &b(json!({"patid": "P1"}), 301)).await),
        10018
    );
    let ok = post(
        &sim,
        "bindCardRelation",
        &b(json!({"patid": "P100234", "qrCodeText": qr}), 302),
    )
    .await;
    assert_eq!(ok["rsp"]["result"], true);
    let card = post(
        &sim,
        "getHealthCardByQRCode",
        &b(json!({"qrCodeText": qr}), 303),
    )
    .await;
    assert_eq!(card["rsp"]["card"]["patid"], "P100234");
    assert_eq!(state(&sim).await["binds"][0]["patid"], "P100234");
}

#[tokio::test]
async fn daily_cap_resets_at_beijing_midnight() {
    let cfg = ehc_agent::sim::SimConfig {
        daily_cap: Some(3),
        ..Default::default()
    };
    let sim = sim_with(cfg).await;
    let t = token(&sim).await;
    let qr = sim.with_state(|s| s.static_code(0)).unwrap();
    let mut codes = vec![];
    for n in 0..4 {
        codes.push(code(
            &post(
                &sim,
                "reportHISData",
                &envelope(&t, &rid(400 + n), report(&qr), SECRET),
            )
            .await,
        ));
    }
    assert_eq!(codes, [0, 0, 0, 10034]);
    // Move the simulated clock to just past the next Beijing midnight.
    let sim_now = state(&sim).await["simNow"].as_i64().unwrap();
    let midnight = ehc_agent::clock::next_midnight(sim_now, ehc_agent::clock::BEIJING);
    control(
        &sim,
        "POST",
        "/_sim/clock",
        json!({"advanceS": midnight - sim_now + 1}),
    )
    .await;
    let t = token(&sim).await; // the old one expired with the jump only if > 2 h; get a fresh one anyway
    assert_eq!(
        code(
            &post(
                &sim,
                "reportHISData",
                &envelope(&t, &rid(410), report(&qr), SECRET)
            )
            .await
        ),
        0
    );
}

#[tokio::test]
async fn hostile_input_gets_an_answer() {
    let sim = sim().await;
    let big = vec![b'{'; (1 << 20) + 10];
    assert_eq!(code(&post_raw(&sim, "reportHISData", big).await), 20004);
    assert_eq!(
        code(&post_raw(&sim, "reportHISData", vec![0xff, 0xfe, 0x00, 0x7b]).await),
        20001
    );
    let deep = "[".repeat(50_000) + &"]".repeat(50_000);
    assert_eq!(
        code(&post_raw(&sim, "reportHISData", deep.into_bytes()).await),
        20001
    );
    assert_eq!(
        code(
            &post_raw(
                &sim,
                "reportHISData",
                b"{\"commonIn\":5,\"req\":{}}".to_vec()
            )
            .await
        ),
        20001
    );
    // Far over the body limit: HTTP 413, and the simulator still serves.
    let huge = vec![b' '; 5 << 20];
    let r = http()
        .post(format!("{}{}", sim.base_url(), path("reportHISData")))
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        code(
            &post(
                &sim,
                "getAppToken",
                &envelope("", &rid(500), json!({"appId": APP_ID}), SECRET)
            )
            .await
        ),
        0
    );
}

#[tokio::test]
async fn faults_take_effect_and_clear() {
    let sim = sim().await;
    let t = token(&sim).await;
    let qr = sim.with_state(|s| s.static_code(0)).unwrap();
    let env = |n| envelope(&t, &rid(n), report(&qr), SECRET);
    let url = format!("{}{}", sim.base_url(), path("reportHISData"));

    set_faults(
        &sim,
        json!({"force": {"code": -1, "count": 2, "api": "reportHISData"}}),
    )
    .await;
    assert_eq!(code(&post(&sim, "reportHISData", &env(600)).await), -1);
    assert_eq!(code(&post(&sim, "reportHISData", &env(601)).await), -1);
    assert_eq!(code(&post(&sim, "reportHISData", &env(602)).await), 0);

    set_faults(
        &sim,
        json!({"api": {"reportHISData": {"http_5xx_rate": 1.0}}}),
    )
    .await;
    let r = http()
        .post(&url)
        .body(env(603).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(calls(&sim, "reportHISData", "http_503").await, 1);

    set_faults(&sim, json!({"api": {"*": {"lost_answer_rate": 1.0}}})).await;
    let r = http()
        .post(&url)
        .body(env(604).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(
        state(&sim).await["uniqueReports"],
        2,
        "a lost answer was still processed"
    );

    set_faults(&sim, json!({"body": {"kind": "not-json", "count": 1}})).await;
    let r = http()
        .post(&url)
        .body(env(605).to_string())
        .send()
        .await
        .unwrap();
    assert!(serde_json::from_str::<Value>(&r.text().await.unwrap()).is_err());
    set_faults(&sim, json!({"body": {"kind": "truncated"}})).await;
    let r = http()
        .post(&url)
        .body(env(606).to_string())
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(
        text.starts_with("{\"commonOut\"") && serde_json::from_str::<Value>(&text).is_err(),
        "{text}"
    );

    set_faults(&sim, json!({"outage": {"mode": "reset"}})).await;
    assert!(http()
        .post(&url)
        .body(env(607).to_string())
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .is_err());
    // The control endpoint still answers during a reset outage, and clears it.
    let r = control(&sim, "DELETE", "/_sim/faults", json!({})).await;
    assert!(r.status().is_success());
    assert_eq!(code(&post(&sim, "reportHISData", &env(608)).await), 0);

    // Invalid faults are refused with a reason.
    let r = control(&sim, "PUT", "/_sim/faults", json!({"api": {"nope": {}}})).await;
    assert_eq!(r.status(), 400);
    let r = control(
        &sim,
        "PUT",
        "/_sim/faults",
        json!({"outage": {"mode": "refuse"}}),
    )
    .await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn refuse_outage_closes_the_port_for_its_window() {
    let sim = sim().await;
    set_faults(&sim, json!({"outage": {"mode": "refuse", "for_s": 1}})).await;
    let url = format!("{}{}", sim.base_url(), path("getAppToken"));
    // Fresh connections are refused while the window lasts...
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let e = client.post(&url).body("{}").send().await.unwrap_err();
    assert!(e.is_connect(), "{e:?}");
    // ...and accepted again once it has passed (bounded wait).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match client.post(&url).body("{}").send().await {
            Ok(r) => {
                assert_eq!(r.status(), 200);
                break;
            }
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            Err(e) => panic!("simulator did not come back: {e}"),
        }
    }
}

#[tokio::test]
async fn control_endpoint_refuses_non_loopback_peers() {
    // Needs an address of this machine that is not loopback.
    let Some(ip) = local_non_loopback_ip() else {
        crate::common::skip(
            "control_endpoint_refuses_non_loopback_peers",
            "this machine has no non-loopback address",
            false,
        );
        return;
    };
    let sim = ehc_agent::sim::SimServer::start(Default::default(), "0.0.0.0:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}:{}/_sim/state", ip, sim.addr.port());
    let r = http().get(url).send().await.unwrap();
    assert_eq!(r.status(), 403);
}

fn local_non_loopback_ip() -> Option<std::net::IpAddr> {
    // The source address the kernel would use towards a documentation
    // address; no packet is sent (UDP connect only picks a route).
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}
