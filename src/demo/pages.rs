//! The stand-ins' own pages (sign-in, checkout): plain HTML forms, no
//! script, the demo banner on top, creditd's stylesheet and security
//! headers.

use actix_web::HttpResponse;

use super::Shared;
pub use crate::http::pages::escape;
use crate::http::pages::{demo_banner, secured};

/// A whole page around `body` (already escaped HTML).
pub fn page(shared: &Shared, title: &str, body: &str) -> HttpResponse {
    let html = format!(
        r#"<!doctype html>
<html lang="fr">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{creditd}/assets/credits/billing.css">
</head>
<body>
{banner}
<main>
{body}
</main>
</body>
</html>"#,
        title = escape(title),
        creditd = escape(&shared.creditd_url),
        banner = demo_banner(
            &shared.creditd_url,
            &super::identity::sign_in_url(shared),
            &super::mailbox::mailbox_url(shared)
        ),
    );
    // The stylesheet comes from creditd, another origin of the machine.
    secured(HttpResponse::Ok())
        .insert_header((
            actix_web::http::header::CONTENT_SECURITY_POLICY,
            format!(
                "default-src 'none'; img-src data:; style-src {}; form-action 'self' {}; base-uri 'none'; frame-ancestors 'none'",
                shared.creditd_url, shared.creditd_url
            ),
        ))
        .content_type("text/html; charset=utf-8")
        .body(html)
}
