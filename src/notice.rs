//! Adverse-action notices: what a customer is told about a decline, a cut or a withdrawal of
//! their limit, and why.
//!
//! A notice is made from the recorded decision alone plus the words of the version that
//! made it: the principal reasons are the record's (the features whose share of the
//! log-odds pushed the probability of default up, computed by that exact version when it
//! decided), at most four (Regulation B asks for the specific principal reasons; the CFPB
//! finds more than four "not likely to be helpful"), largest first, and worded by that
//! version's reason-code table, or by riskserve's default wording when the version has none.
//! Whether a decision needs a notice is [`AdverseAction::of`], the same classification the
//! guardrails and backtests count with. Pure functions; the trace module finds the record
//! and the bundle.

use crate::decision_log::{DecisionRecord, RecordedReason};
use crate::model::MAX_REASONS;
use crate::policy::{AdverseAction, LimitMove, Outcome};
use crate::reason_codes::ReasonCodes;
use crate::rollout::Arm;

/// One principal reason as a notice states it.
#[derive(Debug, Clone, PartialEq)]
pub struct NoticeReason {
    /// 1 for the largest contribution.
    pub rank: usize,
    pub feature: String,
    /// The version's code for the feature; `None` when the version has no table.
    pub code: Option<String>,
    /// The customer's words.
    pub text: String,
    pub contribution: f64,
    pub value: f64,
}

/// Where a notice's words come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wording {
    /// The deciding bundle's `reason_codes.toml`.
    Bundle,
    /// The deciding bundle has no table (it predates them): riskserve's default wording for
    /// its features ([`ReasonCodes::default_for`]), without codes, since codes the version
    /// never declared would look like its own.
    Default,
}

impl Wording {
    pub fn as_str(self) -> &'static str {
        match self {
            Wording::Bundle => "bundle",
            Wording::Default => "default",
        }
    }
}

/// Why a decision needs no notice.
#[derive(Debug, Clone, PartialEq)]
pub enum NotNeeded {
    /// Scored and recorded beside the champion, never returned: the customer never saw it.
    Shadow,
    /// Not an adverse action: approved or under review with the limit raised, held or new.
    Favourable {
        outcome: Outcome,
        moved: LimitMove,
        current_limit: Option<i64>,
        granted_limit: i64,
    },
}

impl NotNeeded {
    /// The reason, for people.
    pub fn describe(&self) -> String {
        match self {
            NotNeeded::Shadow => {
                "a shadow decision: scored and recorded, never returned to the customer".into()
            }
            NotNeeded::Favourable {
                outcome,
                moved,
                current_limit,
                granted_limit,
            } => {
                let limit = match (moved, current_limit) {
                    (LimitMove::Raised, Some(c)) => {
                        format!(
                            "limit raised from {} to {}",
                            amount(*c),
                            amount(*granted_limit)
                        )
                    }
                    (LimitMove::Held, _) => format!("limit held at {}", amount(*granted_limit)),
                    _ => format!("new limit {}", amount(*granted_limit)),
                };
                let pending = if *outcome == Outcome::Review {
                    " (a review is not final)"
                } else {
                    ""
                };
                format!(
                    "{}, {limit}: not an adverse action, no notice is needed{pending}",
                    outcome.as_str()
                )
            }
        }
    }
}

/// A decision's notice, or why it needs none.
#[derive(Debug, Clone)]
pub struct Notice {
    pub decision: DecisionRecord,
    /// `Err` when no notice is needed.
    pub action: Result<AdverseAction, NotNeeded>,
    /// Largest first, at most [`MAX_REASONS`]; empty when no notice is needed.
    pub reasons: Vec<NoticeReason>,
    pub wording: Wording,
    /// The notice as the customer reads it; empty when none is needed.
    pub text: String,
}

/// Whether a recorded decision needs a notice: the adverse action it is, or why it is none.
pub fn needed(record: &DecisionRecord, outcome: Outcome) -> Result<AdverseAction, NotNeeded> {
    let b = &record.body;
    if Arm::parse(&b.arm) == Some(Arm::Shadow) {
        return Err(NotNeeded::Shadow);
    }
    AdverseAction::of(outcome, b.current_limit, b.granted_limit).ok_or(NotNeeded::Favourable {
        outcome,
        moved: LimitMove::of(b.current_limit, b.granted_limit),
        current_limit: b.current_limit,
        granted_limit: b.granted_limit,
    })
}

impl Notice {
    /// The answer for a decision that needs no notice.
    pub fn not_needed(decision: DecisionRecord, why: NotNeeded) -> Notice {
        Notice {
            decision,
            action: Err(why),
            reasons: Vec::new(),
            wording: Wording::Default,
            text: String::new(),
        }
    }

    /// The notice of an adverse decision, worded by the deciding version's table (`None`:
    /// the version has none).
    pub fn adverse(
        decision: DecisionRecord,
        action: AdverseAction,
        table: Option<&ReasonCodes>,
    ) -> Notice {
        let (wording, fallback) = match table {
            Some(_) => (Wording::Bundle, None),
            None => {
                let names: Vec<&str> = decision
                    .body
                    .reasons
                    .iter()
                    .map(|r| r.feature.as_str())
                    .collect();
                (Wording::Default, Some(ReasonCodes::default_for(&names)))
            }
        };
        let reasons = principal(&decision.body.reasons)
            .enumerate()
            .map(|(i, r)| {
                let entry = table.and_then(|t| t.get(&r.feature));
                let text = match (entry, &fallback) {
                    (Some(e), _) => Some(e.text.clone()),
                    (None, Some(f)) => f.get(&r.feature).map(|e| e.text.clone()),
                    // A table is checked to name every feature of its model at load, so a
                    // reason it lacks cannot come from that model; the generic words below
                    // at least name the feature rather than borrow another's.
                    (None, None) => None,
                }
                .unwrap_or_else(|| crate::reason_codes::generic_text(&r.feature));
                NoticeReason {
                    rank: i + 1,
                    feature: r.feature.clone(),
                    code: entry.map(|e| e.code.clone()),
                    text,
                    contribution: r.contribution,
                    value: r.value,
                }
            })
            .collect::<Vec<_>>();
        let text = compose(&decision, action, &reasons);
        Notice {
            decision,
            action: Ok(action),
            reasons,
            wording,
            text,
        }
    }
}

/// The principal reasons of a record: those that pushed the risk up, largest first (ties in
/// recorded order), at most [`MAX_REASONS`]. Records already hold them so; a notice does not
/// rely on it, since a notice that listed a factor that lowered the risk would be false.
fn principal(reasons: &[RecordedReason]) -> impl Iterator<Item = &RecordedReason> {
    let mut up: Vec<&RecordedReason> = reasons.iter().filter(|r| r.contribution > 0.0).collect();
    up.sort_by(|a, b| b.contribution.total_cmp(&a.contribution));
    up.into_iter().take(MAX_REASONS)
}

/// The customer's text: what was done and when, by which version, and the reasons.
fn compose(decision: &DecisionRecord, action: AdverseAction, reasons: &[NoticeReason]) -> String {
    let b = &decision.body;
    let date = b.recorded_at.get(..10).unwrap_or(&b.recorded_at);
    let what = match (action, b.current_limit) {
        (AdverseAction::Withdrawal, c) => format!(
            "we withdrew your credit limit of {}. Your limit is now 0.",
            amount(c.unwrap_or_default())
        ),
        (AdverseAction::Cut, c) => format!(
            "we reduced your credit limit from {} to {}.",
            amount(c.unwrap_or_default()),
            amount(b.granted_limit)
        ),
        (AdverseAction::Decline, None) => "we declined your application for credit.".into(),
        (AdverseAction::Decline, Some(c)) => format!(
            "we declined your request. Your credit limit stays at {}.",
            amount(c)
        ),
    };
    let mut text = format!(
        "On {date} {what}\n\nThis decision was made by an automated credit-risk model, {} \
         version {}.\n\n",
        b.model, b.version
    );
    if reasons.is_empty() {
        text.push_str(
            "No single factor raised your risk above the average customer's; the decision \
             follows from the model's overall assessment of your credit record.\n",
        );
    } else {
        text.push_str("The principal reasons for this decision, the most important first:\n");
        for r in reasons {
            text.push_str(&format!("  {}. {}\n", r.rank, r.text));
        }
    }
    text
}

/// An amount as customers read it: 1234567 → "1,234,567".
pub fn amount(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision_log::RecordBody;

    fn record(
        arm: &str,
        current: Option<i64>,
        granted: i64,
        reasons: &[(&str, f64)],
    ) -> DecisionRecord {
        DecisionRecord {
            seq: 1,
            body: RecordBody {
                decision_id: "d".into(),
                recorded_at: "2026-12-02T10:00:00.000000Z".into(),
                request_id: "r".into(),
                request_hash: String::new(),
                customer_ref: String::new(),
                key_id: String::new(),
                model: "credit-limit".into(),
                version: "v2".into(),
                digest: "sha256:00".into(),
                rollout_id: None,
                arm: arm.into(),
                features: Default::default(),
                probability_of_default: 0.6,
                grade: "F".into(),
                decision: "decline".into(),
                current_limit: current,
                granted_limit: granted,
                reasons: reasons
                    .iter()
                    .map(|(f, c)| RecordedReason {
                        feature: f.to_string(),
                        contribution: *c,
                        value: 1.0,
                    })
                    .collect(),
                caller: None,
                trace_id: None,
                remediates: None,
                pre_harm_limit: None,
                reason: None,
            },
            prev_hash: String::new(),
            hash: String::new(),
            replica: None,
        }
    }

    #[test]
    fn amounts_are_grouped_by_thousands() {
        assert_eq!(amount(0), "0");
        assert_eq!(amount(999), "999");
        assert_eq!(amount(200_000), "200,000");
        assert_eq!(amount(1_234_567), "1,234,567");
        assert_eq!(amount(-1_000), "-1,000");
    }

    #[test]
    fn a_notice_states_at_most_four_reasons_that_raised_the_risk_largest_first() {
        let r = record(
            "candidate",
            Some(200_000),
            0,
            &[
                ("AGE", 0.5),
                ("PAYMENTDELAY_1", 1.5),
                ("BILL_AMT1", -0.2),
                ("PAID_AMT1", 0.1),
                ("EDUCATION", 0.3),
                ("CREDIT_LIMIT", 0.2),
            ],
        );
        let table = ReasonCodes::default_for(&[
            "CREDIT_LIMIT",
            "EDUCATION",
            "AGE",
            "PAYMENTDELAY_1",
            "BILL_AMT1",
            "PAID_AMT1",
        ]);
        let n = Notice::adverse(r.clone(), AdverseAction::Withdrawal, Some(&table));
        let got: Vec<(usize, &str, Option<&str>)> = n
            .reasons
            .iter()
            .map(|x| (x.rank, x.feature.as_str(), x.code.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                (1, "PAYMENTDELAY_1", Some("R01")),
                (2, "AGE", Some("R41")),
                (3, "EDUCATION", Some("R42")),
                (4, "CREDIT_LIMIT", Some("R31")),
            ]
        );
        assert_eq!(n.wording, Wording::Bundle);
        assert!(
            n.text.starts_with(
                "On 2026-12-02 we withdrew your credit limit of 200,000. Your limit is now 0."
            ),
            "{}",
            n.text
        );
        assert!(n.text.contains("credit-limit version v2"), "{}", n.text);
        assert!(
            n.text
                .contains("  1. Timeliness of your payment last month\n  2. Your age\n"),
            "{}",
            n.text
        );

        // Without a table: the default words, no codes.
        let n = Notice::adverse(r, AdverseAction::Withdrawal, None);
        assert_eq!(n.wording, Wording::Default);
        assert_eq!(n.reasons[0].text, "Timeliness of your payment last month");
        assert!(n.reasons.iter().all(|x| x.code.is_none()));
    }

    #[test]
    fn only_adverse_served_decisions_need_a_notice() {
        let r = record("champion", Some(10_000), 12_000, &[]);
        let why = needed(&r, Outcome::Approve).unwrap_err();
        assert_eq!(
            why.describe(),
            "approve, limit raised from 10,000 to 12,000: not an adverse action, no notice is needed"
        );
        let r = record("shadow", Some(10_000), 0, &[]);
        assert_eq!(needed(&r, Outcome::Decline), Err(NotNeeded::Shadow));
        let r = record("candidate", Some(10_000), 8_000, &[]);
        assert_eq!(needed(&r, Outcome::Review), Ok(AdverseAction::Cut));
        let n = Notice::adverse(r, AdverseAction::Cut, None);
        assert!(
            n.text
                .contains("we reduced your credit limit from 10,000 to 8,000.")
        );
        assert!(n.text.contains("No single factor"), "{}", n.text);
        let r = record("champion", None, 0, &[]);
        assert_eq!(needed(&r, Outcome::Decline), Ok(AdverseAction::Decline));
        let n = Notice::adverse(r, AdverseAction::Decline, None);
        assert!(n.text.contains("we declined your application for credit."));
    }
}
