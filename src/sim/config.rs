//! The simulator's own configuration: who it believes it is (app id, secret,
//! hospitals), how strict it is (token lifetime, clock skew, daily cap), its
//! synthetic cards, and the faults it starts with. Everything has a default,
//! so `ehc-agent sim` with no file serves the demo identity.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::faults::Faults;

/// App id the simulator accepts by default (and `demo` uses).
pub const DEFAULT_APP_ID: &str = "ehcsimapp0000000000000000000000001";
/// Its secret. Not a secret: it signs traffic to a local simulator only.
pub const DEFAULT_APP_SECRET: &str = "ehc-sim-secret-not-for-production";
/// Hospital id of the simulated hospital.
pub const DEFAULT_HOSPITAL_ID: &str = "10086";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    pub app_id: String,
    pub app_secret: String,
    /// Hospitals this app may act for; others get 21005.
    pub hospital_ids: Vec<String>,
    /// appToken lifetime (the platform's is 7200 s).
    pub token_ttl_s: u64,
    /// Largest accepted difference between `timestamp` and the simulator's
    /// real clock.
    pub max_skew_s: u64,
    /// Lifetime of minted dynamic codes.
    pub dynamic_ttl_s: u64,
    /// Per-API calls per Beijing day before 10034 (hospitals not yet
    /// launched get 100); absent = no cap.
    pub daily_cap: Option<u64>,
    /// Seed for fault randomness, for reproducible runs.
    pub seed: Option<u64>,
    /// Largest request body accepted (20004 above it).
    pub max_body: usize,
    /// A connection idle this long (seconds) is closed, as the platform's
    /// web front end does; 0 = never.
    pub keepalive_s: u64,
    #[serde(rename = "card")]
    pub cards: Vec<SimCard>,
    pub faults: Faults,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            app_id: DEFAULT_APP_ID.into(),
            app_secret: DEFAULT_APP_SECRET.into(),
            hospital_ids: vec![DEFAULT_HOSPITAL_ID.into()],
            token_ttl_s: 7200,
            max_skew_s: 600,
            dynamic_ttl_s: 300,
            daily_cap: None,
            seed: None,
            max_body: 1 << 20,
            keepalive_s: 60,
            cards: default_cards(),
            faults: Faults::default(),
        }
    }
}

/// A synthetic person. Never a real one: names are 测试 + a number word, ID
/// numbers use the unassigned region code 999999, phones the unassigned
/// prefix 100.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SimCard {
    /// 64 hex characters; derived from the name when absent.
    #[serde(default)]
    pub card_id: Option<String>,
    pub name: String,
    pub gender: String,
    #[serde(default = "han")]
    pub nation: String,
    pub birthday: String,
    #[serde(default = "id01")]
    pub id_type: String,
    pub id_number: String,
    pub phone: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub patid: String,
}

fn han() -> String {
    "汉族".into()
}
fn id01() -> String {
    "01".into()
}

/// The built-in cards.
pub fn default_cards() -> Vec<SimCard> {
    let people = [
        (
            "测试甲",
            "男",
            "1990-01-01",
            "999999199001010011",
            "10000000001",
        ),
        (
            "测试乙",
            "女",
            "1985-06-15",
            "999999198506150022",
            "10000000002",
        ),
        (
            "测试丙",
            "男",
            "2012-11-30",
            "999999201211300033",
            "10000000003",
        ),
        (
            "测试丁",
            "女",
            "1956-03-08",
            "999999195603080044",
            "10000000004",
        ),
    ];
    people
        .iter()
        .map(|(name, gender, birthday, id, phone)| SimCard {
            card_id: None,
            name: (*name).into(),
            gender: (*gender).into(),
            nation: han(),
            birthday: (*birthday).into(),
            id_type: id01(),
            id_number: (*id).into(),
            phone: (*phone).into(),
            address: "模拟市测试区样例路1号".into(),
            patid: String::new(),
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum SimConfigError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("{0}: {1}")]
    Parse(String, String),
    #[error("{0}: {1}")]
    Invalid(String, String),
}

impl SimConfig {
    pub fn load(path: &Path) -> Result<Self, SimConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| SimConfigError::Read(p.clone(), e))?;
        let c: SimConfig =
            toml::from_str(&text).map_err(|e| SimConfigError::Parse(p.clone(), e.to_string()))?;
        c.validate().map_err(|e| SimConfigError::Invalid(p, e))?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.app_id.is_empty() || self.app_secret.is_empty() {
            return Err("app_id and app_secret must not be empty".into());
        }
        if self.hospital_ids.is_empty() {
            return Err("hospital_ids must name at least one hospital".into());
        }
        if self.cards.is_empty() {
            return Err("at least one [[card]] is needed".into());
        }
        if self.token_ttl_s == 0 || self.dynamic_ttl_s == 0 {
            return Err("token_ttl_s and dynamic_ttl_s must be greater than 0".into());
        }
        for (i, c) in self.cards.iter().enumerate() {
            if let Some(id) = &c.card_id {
                if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!("card[{i}].cardId must be 64 hex characters"));
                }
            }
        }
        self.faults.validate()
    }
}
