//! The demo's "Boîte mail": what creditd sent to the demo's SMTP stand-in
//! (`smtp`), newest first, each message decoded (subject, recipient, time,
//! plain text), so a person trying the demo sees the low-balance email
//! arrive after a few chats. Addresses come from the demo's sign-in, which
//! tells creditd each person's address as Clerk does, by a signed
//! `user.updated` (`identity`).

use actix_web::{web, HttpResponse};

use super::pages::{escape, page};
use super::Shared;

pub const MAILBOX_PATH: &str = "/mailbox";

pub fn routes(config: &mut web::ServiceConfig) {
    config.route(MAILBOX_PATH, web::get().to(mailbox));
}

pub fn mailbox_url(shared: &Shared) -> String {
    format!("{}{MAILBOX_PATH}", shared.stand_ins_url)
}

async fn mailbox(shared: web::Data<Shared>) -> HttpResponse {
    let messages = shared.mailbox.messages();
    let mut body = String::from(
        r#"<h1>Boîte mail (démo)</h1>
<p class="credit-balance__message">Les e-mails que creditd a envoyés, reçus par le serveur SMTP local de la démo. Rechargez la page pour voir les nouveaux.</p>
"#,
    );
    if messages.is_empty() {
        body.push_str(r#"<p class="mailbox__empty">Aucun e-mail pour l'instant : une alerte arrive quand le solde passe sous 2€.</p>"#);
    }
    body.push_str(r#"<ol class="mailbox" reversed>"#);
    for message in messages.iter().rev() {
        body.push_str(&format!(
            r#"<li class="panel mailbox__message"><h2 class="mailbox__subject">{subject}</h2><p class="mailbox__meta">À {to} · {at}</p><div class="mailbox__text">{text}</div></li>"#,
            subject = escape(&message.subject()),
            to = escape(&message.to.join(", ")),
            at = message.received_at.format("%d/%m/%Y %H:%M:%S UTC"),
            text = paragraphs(&message.text()),
        ));
    }
    body.push_str("</ol>");
    page(&shared, "Boîte mail · Démo", &body)
}

/// Plain text as HTML paragraphs (blank lines apart), its line breaks kept:
/// the page's policy allows no inline style for a `<pre>` that wraps.
fn paragraphs(text: &str) -> String {
    text.replace("\r\n", "\n")
        .split("\n\n")
        .map(str::trim)
        .filter(|paragraph| !paragraph.is_empty())
        .map(|paragraph| {
            let lines: Vec<String> = paragraph.lines().map(escape).collect();
            format!("<p>{}</p>", lines.join("<br>"))
        })
        .collect()
}
