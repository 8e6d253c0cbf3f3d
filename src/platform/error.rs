//! The platform's global result codes (reference 3.2.12) and the classes that
//! decide what the agent does with each (DESIGN §5).
//!
//! One table holds every code, its text and its class, so that a reader can
//! check the whole mapping at a glance and a test can walk it. Codes that the
//! reference does not list are classed as [`Class::Permanent`] for a request
//! (we cannot know they would ever succeed on retry), which parks the outbox
//! row rather than hammering the platform; `outbox retry` re-queues it.

use std::fmt;

/// What the agent does about a result code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// 0: done.
    Success,
    /// Platform-side trouble: try again later with backoff.
    Retry,
    /// The token is stale or revoked: refresh (single flight), retry once.
    Token,
    /// Daily call cap: hold every upload until the next Beijing-time day.
    RateLimit,
    /// This request is wrong and will stay wrong: park it (`held`).
    Permanent,
    /// The agent's configuration is wrong (secret, appId, hospital): stop
    /// uploads, keep every row, tell the operator.
    Configuration,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Success => "success",
            Class::Retry => "retry",
            Class::Token => "token",
            Class::RateLimit => "rate_limit",
            Class::Permanent => "permanent",
            Class::Configuration => "configuration",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

use Class::*;

/// Every code of reference 3.2.12: (code, text, class).
pub const RESULT_CODES: &[(i64, &str, Class)] = &[
    (0, "请求成功", Success),
    (1, "适配平台出错", Retry),
    (-1, "卡管平台异常", Retry),
    (-2, "HTTP 服务异常", Retry),
    (10001, "发生了异常", Retry),
    (10002, "请求参数 req 不能为空", Permanent),
    (10003, "请求参数 commonIn 不能为空", Permanent),
    (10004, "uid 不能为空", Permanent),
    (10005, "数据库错误", Retry),
    (10006, "健康卡号不能为空", Permanent),
    (10007, "健康卡授权码不能为空", Permanent),
    (10008, "健康卡授权码不存在", Permanent),
    (10009, "健康卡授权码不合法", Permanent),
    (10010, "系统接口异常，请尝试刷新页面", Permanent),
    (10011, "微信身份码不合法", Permanent),
    (10012, "微信身份码不能为空", Permanent),
    (10013, "姓名不能为空", Permanent),
    (10014, "证件号不能为空", Permanent),
    (10015, "核身不通过", Permanent),
    (-10017, "获取健康卡失败", Permanent),
    (10018, "二维码不能为空", Permanent),
    (-10019, "健康卡不存在", Permanent),
    (10020, "二维码识别失败", Permanent),
    (10021, "健康卡授权码检验异常", Permanent),
    (
        -10022,
        "该手机号码对应的电子卡已经存在，请勿重复申请",
        Permanent,
    ),
    (
        -10023,
        "该证件号码对应的电子卡已经存在，请勿重复申请",
        Permanent,
    ),
    (-10024, "终端信息不合法，调用失败", Permanent),
    (
        -10025,
        "缺少参数（姓名、性别、民族、手机号码、证件类型、证件号码为必填项）",
        Permanent,
    ),
    (-10026, "身份证格式不合法", Permanent),
    (-10027, "身份证不合法", Permanent),
    (-10028, "主索引合适身份证号码重复", Permanent),
    (-10029, "请检查加密机链接", Retry),
    (10030, "没有电子健康卡号", Permanent),
    (-10031, "该电子卡已被冻结或注销，无法绑定", Permanent),
    (
        -10032,
        "该身份证号码对应的电子卡已经存在，请勿重复申请",
        Permanent,
    ),
    (10033, "患者 ID 不能为空", Permanent),
    (10034, "接口调用次数限制", RateLimit),
    (10035, "业务流水号不能为空", Permanent),
    (10036, "消息推送时间不能为空或格式错误", Permanent),
    (10037, "requestId 字段长度超出限制（512byte）", Permanent),
    (-10038, "核身异常", Permanent),
    (-10039, "ocr 识别失败", Permanent),
    (-10040, "ocr 失败异常", Permanent),
    (10041, "ocr 图片内容不得为空", Permanent),
    (10042, "参数错误", Permanent),
    (10043, "手机号不得为空", Permanent),
    (-10044, "卡管平台返回错误", Retry),
    (10048, "更新健康卡信息失败", Permanent),
    (10050, "开始日期不能大于或等于结束日期", Permanent),
    (10051, "日期格式错误", Permanent),
    (10053, "订单号不存在", Permanent),
    // For a retried outbox row this means "already received": the caller
    // treats it as success for that row. As a first answer it is a bug of ours.
    (10054, "重复请求", Permanent),
    (10055, "模板 ID 不得为空", Permanent),
    (10056, "输入的姓名与卡管平台保存的姓名不一致", Permanent),
    (
        10057,
        "绑定人数已达上限，请前往电子居民健康卡小程序解绑",
        Permanent,
    ),
    (-110086, "卡管平台返回错误", Retry),
    (20000, "鉴权失败", Configuration),
    (20001, "参数格式错误", Permanent),
    (20002, "无效参数", Permanent),
    (20003, "业务服务响应格式错误", Retry),
    (20004, "请求参数过长", Permanent),
    (21001, "appToken 不能为空", Configuration),
    (21002, "非法 appId 或 appSecret", Configuration),
    (21003, "appToken 超时", Token),
    (21004, "非法 appToken 或 hospitalId", Token),
    (21005, "无权操作该医院 ID", Configuration),
    (21006, "签名错误", Configuration),
    (21007, "接口调用被限制", RateLimit),
];

/// The result code meaning "this requestId was already answered".
pub const DUPLICATE_REQUEST: i64 = 10054;

/// The class of a result code; unknown codes are [`Class::Permanent`].
pub fn classify(code: i64) -> Class {
    RESULT_CODES
        .iter()
        .find(|(c, _, _)| *c == code)
        .map(|(_, _, k)| *k)
        .unwrap_or(Permanent)
}

/// The reference's text for a code, if it lists it.
pub fn describe(code: i64) -> Option<&'static str> {
    RESULT_CODES
        .iter()
        .find(|(c, _, _)| *c == code)
        .map(|(_, t, _)| *t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the whole table: each code once, and the classes DESIGN §5 names
    /// explicitly are exactly as it says.
    #[test]
    fn whole_table() {
        let mut seen = std::collections::HashSet::new();
        for (code, text, class) in RESULT_CODES {
            assert!(seen.insert(*code), "code {code} listed twice");
            assert!(!text.is_empty());
            assert_eq!(classify(*code), *class);
            assert_eq!(describe(*code), Some(*text));
        }
        assert_eq!(seen.len(), 68, "reference 3.2.12 lists 68 codes");
        for c in [1, -1, -2, 10001, 10005, -10044, -110086] {
            assert_eq!(classify(c), Retry, "{c}");
        }
        for c in [21003, 21004] {
            assert_eq!(classify(c), Token, "{c}");
        }
        for c in [10034, 21007] {
            assert_eq!(classify(c), RateLimit, "{c}");
        }
        for c in [10042, 20001, 20002, 10018, 10020, -10019] {
            assert_eq!(classify(c), Permanent, "{c}");
        }
        for c in [20000, 21001, 21002, 21005, 21006] {
            assert_eq!(classify(c), Configuration, "{c}");
        }
        assert_eq!(classify(0), Success);
        assert_eq!(classify(424242), Permanent);
        assert_eq!(describe(424242), None);
    }
}
