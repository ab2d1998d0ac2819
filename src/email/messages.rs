//! The emails' words: which outbox event becomes which email, and its
//! French text (plain, and the same blocks as simple HTML), in the billing
//! page's wording and money format (`12.34€`). Pure functions of the
//! event's data, so each is tested here without a server.

use serde_json::Value;

use crate::money::Micros;

/// What an email is about; the `kind` label of `creditd_emails_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `balance.low`: the available balance fell under the threshold.
    LowBalance,
    /// `balance.depleted`: it fell to zero or below.
    Depleted,
    /// `auto_recharge.failed`: the card was refused (auto-recharge is off).
    AutoRechargeFailed,
    /// `auto_recharge.disabled` on creditd's own (a dispute, a refund).
    AutoRechargeDisabled,
    /// `auto_recharge.succeeded`: the receipt of an auto-recharge.
    AutoRechargeReceipt,
    /// `topup.succeeded`: the receipt of a top-up.
    TopUpReceipt,
}

/// Every kind, for the metric's zero-valued series.
pub const KINDS: [Kind; 6] = [
    Kind::LowBalance,
    Kind::Depleted,
    Kind::AutoRechargeFailed,
    Kind::AutoRechargeDisabled,
    Kind::AutoRechargeReceipt,
    Kind::TopUpReceipt,
];

impl Kind {
    /// The email an event becomes; `Err` with the reason it becomes none.
    /// `auto_recharge.disabled` after a failed attempt (it names the
    /// attempt) is already told by that failure's email.
    pub fn of_event(event_type: &str, data: &Value) -> Result<Kind, &'static str> {
        match event_type {
            "balance.low" => Ok(Kind::LowBalance),
            "balance.depleted" => Ok(Kind::Depleted),
            "auto_recharge.failed" => Ok(Kind::AutoRechargeFailed),
            "auto_recharge.disabled" if data.get("attemptId").is_some_and(|a| !a.is_null()) => {
                Err("announced_with_failure")
            }
            "auto_recharge.disabled" => Ok(Kind::AutoRechargeDisabled),
            "auto_recharge.succeeded" => Ok(Kind::AutoRechargeReceipt),
            "topup.succeeded" => Ok(Kind::TopUpReceipt),
            _ => Err("not_an_email"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::LowBalance => "low_balance",
            Kind::Depleted => "depleted",
            Kind::AutoRechargeFailed => "auto_recharge_failed",
            Kind::AutoRechargeDisabled => "auto_recharge_disabled",
            Kind::AutoRechargeReceipt => "auto_recharge_receipt",
            Kind::TopUpReceipt => "topup_receipt",
        }
    }

    /// Alerts can be switched off by the person; receipts cannot.
    pub fn is_alert(self) -> bool {
        !matches!(self, Kind::AutoRechargeReceipt | Kind::TopUpReceipt)
    }
}

/// One email, ready for the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// The links an email may carry.
#[derive(Debug, Clone, Copy)]
pub struct Links<'a> {
    /// The billing page (`email.billing_url`).
    pub billing: &'a str,
    /// A top-up's invoice page, when Stripe gave one.
    pub invoice: Option<&'a str>,
}

/// Why an event's data cannot make its email (a bug in what wrote it).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the event's data has no valid `{0}`")]
pub struct MissingField(pub &'static str);

/// A part of the email, written once for both the text and the HTML.
enum Block {
    Paragraph(String),
    Link { label: &'static str, url: String },
    Footer(String),
}

/// The email of `kind` from its event's `data`.
pub fn compose(kind: Kind, data: &Value, links: Links<'_>) -> Result<Email, MissingField> {
    let (subject, blocks) = match kind {
        Kind::LowBalance => low_balance(data, links)?,
        Kind::Depleted => depleted(data, links)?,
        Kind::AutoRechargeFailed => auto_recharge_failed(data, links)?,
        Kind::AutoRechargeDisabled => auto_recharge_disabled(data, links)?,
        Kind::AutoRechargeReceipt => auto_recharge_receipt(data, links)?,
        Kind::TopUpReceipt => topup_receipt(data, links)?,
    };
    Ok(Email {
        subject,
        text: text(&blocks),
        html: html(&blocks),
    })
}

fn micros(data: &Value, field: &'static str) -> Result<Micros, MissingField> {
    data.get(field)
        .and_then(Value::as_i64)
        .map(Micros::new)
        .ok_or(MissingField(field))
}

fn cents(data: &Value, field: &'static str) -> Result<Micros, MissingField> {
    data.get(field)
        .and_then(Value::as_i64)
        .and_then(|cents| Micros::from_cents(cents).ok())
        .ok_or(MissingField(field))
}

/// Stripe's code or creditd's reason, as the billing page words it.
pub fn reason_text(reason: &str) -> String {
    match reason {
        "card_declined" => "votre carte a été refusée".into(),
        "authentication_required" => "votre banque demande une authentification : faites une recharge manuelle pour la confirmer".into(),
        "no_saved_card" => "aucune carte n'est enregistrée".into(),
        "dispute" => "un paiement de votre compte fait l'objet d'un litige, la carte enregistrée a été oubliée".into(),
        "refunded" => "une recharge automatique a été remboursée : réactivez-la si vous le souhaitez".into(),
        "account_deleted" => "votre compte a été supprimé, la carte enregistrée a été oubliée".into(),
        "operator" => "notre équipe l'a désactivée : répondez à cet e-mail pour en savoir plus".into(),
        other => {
            // A code of Stripe's: shown as is, once only its own characters.
            let code: String = other
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(64)
                .collect();
            format!("le paiement a échoué ({code})")
        }
    }
}

fn reason(data: &Value) -> String {
    reason_text(data.get("reason").and_then(Value::as_str).unwrap_or(""))
}

const ALERTS_FOOTER: &str = "Vous recevez cet e-mail parce que les alertes de solde sont activées : vous pouvez les désactiver sur la page Facturation.";

fn recharge_link(links: Links<'_>) -> Block {
    Block::Link {
        label: "Recharger",
        url: links.billing.to_owned(),
    }
}

fn low_balance(data: &Value, links: Links<'_>) -> Result<(String, Vec<Block>), MissingField> {
    let available = micros(data, "availableMicros")?;
    let threshold = micros(data, "thresholdMicros")?;
    Ok((
        format!("Solde bas : il vous reste {available}"),
        vec![
            Block::Paragraph("Bonjour,".into()),
            Block::Paragraph(format!(
                "Votre solde de crédits AI est passé sous {threshold} : il vous reste {available}. Quand il sera épuisé, vos conversations avec l'IA s'arrêteront jusqu'à votre prochaine recharge."
            )),
            recharge_link(links),
            Block::Footer(ALERTS_FOOTER.into()),
        ],
    ))
}

fn depleted(data: &Value, links: Links<'_>) -> Result<(String, Vec<Block>), MissingField> {
    let available = micros(data, "availableMicros")?;
    Ok((
        "Solde épuisé : vos conversations sont en pause".into(),
        vec![
            Block::Paragraph("Bonjour,".into()),
            Block::Paragraph(format!(
                "Votre solde de crédits AI est épuisé ({available} disponibles) : vos conversations avec l'IA sont en pause jusqu'à votre prochaine recharge."
            )),
            recharge_link(links),
            Block::Footer(ALERTS_FOOTER.into()),
        ],
    ))
}

fn auto_recharge_failed(
    data: &Value,
    links: Links<'_>,
) -> Result<(String, Vec<Block>), MissingField> {
    let amount = cents(data, "amountCents")?;
    Ok((
        format!("La recharge automatique de {amount} a échoué"),
        vec![
            Block::Paragraph("Bonjour,".into()),
            Block::Paragraph(format!(
                "La recharge automatique de {amount} n'a pas pu être effectuée : {}.",
                reason(data)
            )),
            Block::Paragraph(
                "La recharge automatique est désactivée : vos crédits ne seront plus rechargés tant que vous ne l'aurez pas réactivée.".into(),
            ),
            recharge_link(links),
            Block::Footer(ALERTS_FOOTER.into()),
        ],
    ))
}

fn auto_recharge_disabled(
    data: &Value,
    links: Links<'_>,
) -> Result<(String, Vec<Block>), MissingField> {
    Ok((
        "Recharge automatique désactivée".into(),
        vec![
            Block::Paragraph("Bonjour,".into()),
            Block::Paragraph(format!(
                "La recharge automatique de vos crédits AI est désactivée : {}.",
                reason(data)
            )),
            Block::Link {
                label: "Voir la facturation",
                url: links.billing.to_owned(),
            },
            Block::Footer(ALERTS_FOOTER.into()),
        ],
    ))
}

fn auto_recharge_receipt(
    data: &Value,
    links: Links<'_>,
) -> Result<(String, Vec<Block>), MissingField> {
    let amount = micros(data, "amountMicros")?;
    let balance = micros(data, "balanceMicros")?;
    Ok((
        format!("Reçu : recharge automatique de {amount}"),
        vec![
            Block::Paragraph("Bonjour,".into()),
            Block::Paragraph(format!(
                "Votre carte a été débitée de {amount} par la recharge automatique de vos crédits AI. Nouveau solde : {balance}."
            )),
            Block::Link {
                label: "Historique",
                url: links.billing.to_owned(),
            },
        ],
    ))
}

fn topup_receipt(data: &Value, links: Links<'_>) -> Result<(String, Vec<Block>), MissingField> {
    let amount = micros(data, "amountMicros")?;
    let balance = micros(data, "balanceMicros")?;
    let mut blocks = vec![
        Block::Paragraph("Bonjour,".into()),
        Block::Paragraph(format!(
            "Merci ! Votre recharge de {amount} a été créditée. Nouveau solde : {balance}."
        )),
    ];
    if let Some(invoice) = links.invoice {
        blocks.push(Block::Link {
            label: "Facture",
            url: invoice.to_owned(),
        });
    }
    blocks.push(Block::Link {
        label: "Historique",
        url: links.billing.to_owned(),
    });
    Ok((format!("Reçu : recharge de {amount}"), blocks))
}

fn text(blocks: &[Block]) -> String {
    let parts: Vec<String> = blocks
        .iter()
        .map(|block| match block {
            Block::Paragraph(text) => text.clone(),
            Block::Link { label, url } => format!("{label} : {url}"),
            Block::Footer(text) => format!("--\n{text}"),
        })
        .collect();
    let mut text = parts.join("\n\n");
    text.push('\n');
    text
}

fn html(blocks: &[Block]) -> String {
    let mut html = String::from(
        "<!doctype html><html lang=\"fr\"><body style=\"font-family: system-ui, sans-serif; color: #1f2328; max-width: 36rem;\">",
    );
    for block in blocks {
        match block {
            Block::Paragraph(text) => {
                html.push_str(&format!("<p>{}</p>", escape(text)));
            }
            Block::Link { label, url } => html.push_str(&format!(
                "<p><a href=\"{}\" style=\"display: inline-block; padding: 0.5rem 1rem; background: #0969da; color: #fff; border-radius: 0.4rem; text-decoration: none;\">{}</a></p>",
                escape(url),
                escape(label)
            )),
            Block::Footer(text) => html.push_str(&format!(
                "<p style=\"color: #656d76; font-size: 0.85rem;\">{}</p>",
                escape(text)
            )),
        }
    }
    html.push_str("</body></html>");
    html
}

/// Text for HTML content and attribute values. Five replacements: a crate
/// for them would be larger than the function.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LINKS: Links<'static> = Links {
        billing: "https://app.example.com/billing",
        invoice: None,
    };

    #[test]
    fn a_low_balance_email_names_the_balance_the_threshold_and_the_billing_link() {
        let data = json!({"availableMicros": 1_500_000, "balanceMicros": 1_500_000, "thresholdMicros": 2_000_000});
        let email = compose(Kind::LowBalance, &data, LINKS).expect("composed");
        assert_eq!(email.subject, "Solde bas : il vous reste 1.50€");
        assert!(
            email
                .text
                .contains("passé sous 2.00€ : il vous reste 1.50€"),
            "{}",
            email.text
        );
        assert!(email
            .text
            .contains("Recharger : https://app.example.com/billing"));
        assert!(email
            .html
            .contains("href=\"https://app.example.com/billing\""));
    }

    #[test]
    fn a_disable_that_follows_a_failed_attempt_makes_no_second_email() {
        let after_failure = json!({"attemptId": "6f1c…", "reason": "card_declined"});
        let on_its_own = json!({"reason": "dispute"});
        assert_eq!(
            Kind::of_event("auto_recharge.disabled", &after_failure),
            Err("announced_with_failure")
        );
        assert_eq!(
            Kind::of_event("auto_recharge.disabled", &on_its_own),
            Ok(Kind::AutoRechargeDisabled)
        );
    }

    #[test]
    fn a_failed_auto_recharge_says_why_in_the_billing_pages_words() {
        let data = json!({"amountCents": 2000, "reason": "card_declined"});
        let email = compose(Kind::AutoRechargeFailed, &data, LINKS).expect("composed");
        assert_eq!(email.subject, "La recharge automatique de 20.00€ a échoué");
        assert!(
            email.text.contains("votre carte a été refusée"),
            "{}",
            email.text
        );
        assert_eq!(
            reason_text("expired_card<script>"),
            "le paiement a échoué (expired_cardscript)"
        );
    }

    #[test]
    fn a_receipt_carries_the_invoice_link_when_there_is_one_and_no_opt_out_footer() {
        let data = json!({"amountMicros": 20_000_000, "balanceMicros": 21_500_000});
        let links = Links {
            invoice: Some("https://invoice.stripe.com/i/x?a=1&b=2"),
            ..LINKS
        };
        let email = compose(Kind::TopUpReceipt, &data, links).expect("composed");
        assert_eq!(email.subject, "Reçu : recharge de 20.00€");
        assert!(email.text.contains("Nouveau solde : 21.50€"));
        assert!(email
            .text
            .contains("Facture : https://invoice.stripe.com/i/x?a=1&b=2"));
        assert!(email
            .html
            .contains("href=\"https://invoice.stripe.com/i/x?a=1&amp;b=2\""));
        assert!(!email.text.contains("alertes"));
        assert!(!Kind::TopUpReceipt.is_alert());
    }

    #[test]
    fn data_without_its_amount_is_refused_naming_the_field() {
        let refused = compose(Kind::Depleted, &json!({}), LINKS);
        assert_eq!(refused, Err(MissingField("availableMicros")));
    }
}
