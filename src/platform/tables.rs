//! The code tables of the reference's appendix (3.3.1 scenes, 3.3.2 card
//! types, 3.3.3 channels), in one place, because the configuration check, the
//! pipeline and the simulator must all agree on what is a valid code.

/// 3.3.1 用卡环节表: (code, name).
pub const SCENES: &[(&str, &str)] = &[
    ("010101", "挂号"),
    ("0101011", "预约挂号"),
    ("0101012", "当日挂号"),
    ("0101013", "挂号记录"),
    ("0101014", "预约导诊"),
    ("0101015", "当日取号"),
    ("010102", "诊断"),
    ("0101021", "排队候诊"),
    ("0101022", "门诊记录"),
    ("0101023", "病历打印"),
    ("010103", "取药"),
    ("0101031", "取药记录"),
    ("010104", "检查"),
    ("0101041", "预约检查"),
    ("0101042", "预约检查记录"),
    ("010105", "收费"),
    ("0101051", "门诊缴费"),
    ("0101052", "门诊缴费记录"),
    ("0101053", "住院缴费"),
    ("0101054", "住院缴费记录"),
    ("0101055", "门诊充值"),
    ("0101056", "住院充值"),
    ("010106", "开方"),
    ("010108", "取（查询）报告"),
    ("0101081", "取（查询）检查报告"),
    ("0101082", "取（查询）检验报告"),
    ("0101083", "取（查询）体检报告"),
    ("010109", "住院登记"),
    ("00000", "其他"),
    ("00001", "便民服务"),
    ("00002", "孕期保健"),
    ("00003", "儿童保健"),
    ("00004", "家庭医生"),
    ("00005", "在线问诊"),
    ("00006", "计划免疫"),
    ("00007", "个人信息"),
];

/// 3.3.2 证件类型表.
pub const CARD_TYPES: &[(&str, &str)] = &[
    ("01", "居民身份证"),
    ("02", "居民户口簿"),
    ("03", "护照"),
    ("04", "军官证"),
    ("05", "驾驶证"),
    ("06", "港澳居民来往内地通行证"),
    ("07", "台湾居民来往内地通行证"),
    ("08", "出生医学证明"),
    ("09", "医保卡"),
    ("10", "就诊卡"),
    ("11", "健康卡"),
    ("99", "其他法定有效证件"),
];

/// The card type of the electronic health card itself: with it, reportHISData
/// needs the QR text and not the name or ID number (errata, DESIGN §9).
pub const CARD_TYPE_HEALTH_CARD: &str = "11";

/// 3.3.3 用卡渠道表.
pub const CHANNELS: &[(&str, &str)] = &[
    ("0100", "人工窗口"),
    ("0200", "自助机"),
    ("0300", "医生工作台"),
    ("0400", "微信渠道"),
    ("0401", "服务号"),
    ("0402", "小程序"),
    ("0000", "其他"),
];

/// Scenes for which reportHISData requires a department (3.2.7).
pub const SCENES_NEEDING_DEPARTMENT: &[&str] = &["010101", "0101011", "0101012"];

fn lookup(table: &'static [(&'static str, &'static str)], code: &str) -> Option<&'static str> {
    table.iter().find(|(c, _)| *c == code).map(|(_, n)| *n)
}

pub fn scene_name(code: &str) -> Option<&'static str> {
    lookup(SCENES, code)
}

pub fn channel_name(code: &str) -> Option<&'static str> {
    lookup(CHANNELS, code)
}

pub fn card_type_name(code: &str) -> Option<&'static str> {
    lookup(CARD_TYPES, code)
}

pub fn scene_needs_department(scene: &str) -> bool {
    SCENES_NEEDING_DEPARTMENT.contains(&scene)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_have_unique_codes() {
        for t in [SCENES, CARD_TYPES, CHANNELS] {
            let mut codes: Vec<_> = t.iter().map(|(c, _)| c).collect();
            codes.sort();
            let n = codes.len();
            codes.dedup();
            assert_eq!(n, codes.len());
        }
    }

    #[test]
    fn lookups() {
        assert_eq!(scene_name("010101"), Some("挂号"));
        assert_eq!(scene_name("0101"), None);
        assert_eq!(channel_name("0200"), Some("自助机"));
        assert_eq!(card_type_name("11"), Some("健康卡"));
        assert!(scene_needs_department("0101012"));
        assert!(!scene_needs_department("010104"));
    }
}
