//! Stripe: top-ups against a local Stripe API that checks what creditd
//! sends, and webhooks signed as Stripe's own libraries sign them.

mod checkout;
mod disputes;
mod followups;
mod invoices;
mod refunds;
mod subscriptions;
mod top_ups;
mod webhook_signature;

use crate::support::stripe::*;

/// Delivers a paid top-up of `cents` for `clerk_id`; its account id.
pub async fn top_up(stripe: &StripeApp, clerk_id: &str, session: &str, cents: i64) -> i64 {
    let account = stripe.app.account(clerk_id).await.0;
    let status = stripe
        .deliver(&event(
            &format!("evt_{session}"),
            "checkout.session.completed",
            checkout_session(session, account, cents, "paid"),
        ))
        .await;
    assert_eq!(status, 200);
    account
}
