//! The Stripe API client creditd uses: one customer per user and one
//! Checkout Session per top-up, each with an idempotency key.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use stripe::{IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_checkout::checkout_session::CreateCheckoutSessionPaymentIntentDataSetupFutureUsage;
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionAdaptivePricing,
    CreateCheckoutSessionInvoiceCreation, CreateCheckoutSessionLineItems,
    CreateCheckoutSessionLineItemsPriceData, CreateCheckoutSessionPaymentIntentData, ProductData,
};
use stripe_checkout::CheckoutSessionMode;
use stripe_core::customer::CreateCustomer;
use stripe_core::payment_intent::{
    CreatePaymentIntent, CreatePaymentIntentOffSession, SearchPaymentIntent,
};
use stripe_core::PaymentIntentStatus;

use super::metadata::{PaymentKind, PaymentMetadata};
use crate::config::StripeSettings;
use crate::money::Micros;

/// Top-ups of the same account and amount asked within one window of this
/// many seconds share an idempotency key, so Stripe answers a double click
/// (or a client retry) with the session it already created. A genuine second
/// top-up later gets a new session. A duplicate that slips past a window
/// boundary costs nothing: an unpaid session credits nothing.
pub const TOPUP_SESSION_WINDOW_S: i64 = 10;

/// Why a Stripe call failed.
#[derive(Debug, thiserror::Error)]
pub enum StripeCallError {
    /// Stripe answered with an error status.
    #[error("Stripe refused the request (status {status}): {message}")]
    Refused { status: u16, message: String },
    /// No usable answer (network, timeout, unreadable body).
    #[error("Stripe did not answer usably: {0}")]
    Unreachable(String),
}

impl From<StripeError> for StripeCallError {
    fn from(error: StripeError) -> StripeCallError {
        match error {
            StripeError::Stripe(errors, status) => StripeCallError::Refused {
                status,
                message: errors.message.unwrap_or_else(|| "no message".into()),
            },
            other => StripeCallError::Unreachable(other.to_string()),
        }
    }
}

/// A Checkout Session as the top-up route answers it.
#[derive(Debug, Clone)]
pub struct TopupSession {
    pub id: String,
    pub url: String,
}

/// The Stripe API, with its settings.
pub struct StripeApi {
    client: stripe::Client,
    /// For the one read creditd makes (a payment intent's metadata).
    http: reqwest::Client,
    settings: StripeSettings,
}

impl StripeApi {
    /// `None` when `stripe.secret_key` is not set: top-ups are off.
    pub fn new(settings: &StripeSettings) -> anyhow::Result<Option<StripeApi>> {
        if settings.secret_key.is_empty() {
            return Ok(None);
        }
        let mut base = settings.api_base.clone();
        if !base.ends_with('/') {
            base.push('/');
        }
        let client = stripe::ClientBuilder::new(settings.secret_key.expose())
            .url(base)
            .timeout(Duration::from_millis(settings.timeout_ms))
            .build()
            .map_err(|e| anyhow::anyhow!("stripe client: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .build()?;
        Ok(Some(StripeApi {
            client,
            http,
            settings: settings.clone(),
        }))
    }

    /// Creates the Stripe customer of the account `user_id`. The idempotency key is the
    /// account's own, so concurrent first top-ups get the same customer.
    pub async fn create_customer(
        &self,
        user_id: i64,
        clerk_id: &str,
        email: Option<&str>,
        name: Option<&str>,
    ) -> Result<String, StripeCallError> {
        let mut request = CreateCustomer::new().metadata(HashMap::from([
            ("userId".to_owned(), user_id.to_string()),
            ("clerkId".to_owned(), clerk_id.to_owned()),
        ]));
        if let Some(email) = email {
            request = request.email(email);
        }
        if let Some(name) = name {
            request = request.name(name);
        }
        let key = idempotency_key(format!("creditd-customer-{user_id}"))?;
        let customer = observe(
            "create_customer",
            request
                .customize()
                .request_strategy(RequestStrategy::Idempotent(key))
                .send(&self.client)
                .await,
        )?;
        Ok(customer.id.to_string())
    }

    /// Creates the Checkout Session of a top-up of `amount_cents`.
    pub async fn create_topup_session(
        &self,
        user_id: i64,
        customer: &str,
        amount_cents: i64,
        now_s: i64,
    ) -> Result<TopupSession, StripeCallError> {
        let settings = &self.settings;
        let amount = Micros::from_cents(amount_cents)
            .map_err(|_| StripeCallError::Unreachable("amount overflows".into()))?;
        let currency = stripe_types::Currency::from_str(&settings.currency)
            .map_err(|never| StripeCallError::Unreachable(format!("{never:?}")))?;
        let mut product = ProductData::new(settings.product_name.clone());
        product.description = Some(format!("{amount} de crédits AI"));
        let mut price = CreateCheckoutSessionLineItemsPriceData::new(currency);
        price.unit_amount = Some(amount_cents);
        price.product_data = Some(product);
        let mut line = CreateCheckoutSessionLineItems::new();
        line.price_data = Some(price);
        line.quantity = Some(1);
        let mut adaptive = CreateCheckoutSessionAdaptivePricing::new();
        // Credits are bought in the ledger's currency only.
        adaptive.enabled = Some(false);
        let metadata = PaymentMetadata {
            kind: PaymentKind::CreditTopup,
            user_id,
            amount_cents,
            attempt_id: None,
        }
        .to_metadata();
        // Stripe copies the payment intent's metadata to its charge: a
        // refund webhook can then tell a top-up charge from any other.
        let mut payment_intent = CreateCheckoutSessionPaymentIntentData::new();
        payment_intent.metadata = Some(metadata.clone());
        // The card is kept for auto-recharges, charged off session.
        payment_intent.setup_future_usage =
            Some(CreateCheckoutSessionPaymentIntentDataSetupFutureUsage::OffSession);
        let request = CreateCheckoutSession::new()
            .mode(CheckoutSessionMode::Payment)
            .customer(customer)
            .client_reference_id(user_id.to_string())
            .line_items(vec![line])
            .adaptive_pricing(adaptive)
            .invoice_creation(CreateCheckoutSessionInvoiceCreation::new(true))
            .payment_intent_data(payment_intent)
            .metadata(metadata)
            .success_url(settings.success_url.clone())
            .cancel_url(settings.cancel_url.clone());
        let window = now_s.div_euclid(TOPUP_SESSION_WINDOW_S);
        let key = idempotency_key(format!("creditd-topup-{}-{amount_cents}-{window}", user_id))?;
        let session = observe(
            "create_checkout_session",
            request
                .customize()
                .request_strategy(RequestStrategy::Idempotent(key))
                .send(&self.client)
                .await,
        )?;
        let url = session.url.ok_or_else(|| {
            StripeCallError::Unreachable("the Checkout Session has no url".into())
        })?;
        Ok(TopupSession {
            id: session.id.to_string(),
            url,
        })
    }
}

impl StripeApi {
    /// Whether a payment intent paid a top-up (`metadata.type =
    /// credit_topup`, set by `create_topup_session`): a dispute names only
    /// its payment intent, not the intent's metadata.
    pub async fn is_topup_payment(&self, payment_intent: &str) -> Result<bool, StripeCallError> {
        #[derive(serde::Deserialize)]
        struct PaymentIntent {
            #[serde(default)]
            metadata: HashMap<String, String>,
        }
        let intent: Option<PaymentIntent> = self
            .retrieve("payment_intents", payment_intent, "retrieve_payment_intent")
            .await?;
        // An auto-recharge's payment credits as a top-up does.
        Ok(intent.is_some_and(|intent| {
            matches!(
                PaymentKind::of(&intent.metadata),
                Some(PaymentKind::CreditTopup | PaymentKind::AutoRecharge)
            )
        }))
    }

    /// The invoice `id` (`None` when Stripe has no such invoice): where the
    /// customer reads the invoice of a top-up.
    pub async fn retrieve_invoice(
        &self,
        id: &str,
    ) -> Result<Option<crate::stripe::events::Invoice>, StripeCallError> {
        self.retrieve("invoices", id, "retrieve_invoice").await
    }

    /// `GET /v1/{collection}/{id}`: `None` when Stripe has no such object
    /// (or `id` cannot be one), an error when Stripe cannot be asked.
    async fn retrieve<T: serde::de::DeserializeOwned>(
        &self,
        collection: &str,
        id: &str,
        operation: &'static str,
    ) -> Result<Option<T>, StripeCallError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Ok(None);
        }
        let url = format!(
            "{}/v1/{collection}/{id}",
            self.settings.api_base.trim_end_matches('/')
        );
        let sent = self
            .http
            .get(url)
            .bearer_auth(self.settings.secret_key.expose())
            .send()
            .await;
        let outcome = match &sent {
            Ok(response) if response.status().is_success() => "ok",
            Ok(_) => "refused",
            Err(_) => "unreachable",
        };
        metrics::counter!(crate::telemetry::STRIPE_REQUESTS_TOTAL.name, "operation" => operation, "outcome" => outcome)
            .increment(1);
        let response = sent.map_err(|e| StripeCallError::Unreachable(e.to_string()))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(StripeCallError::Refused {
                status: status.as_u16(),
                message: format!("{operation}: Stripe answered {status}"),
            });
        }
        response
            .json()
            .await
            .map(Some)
            .map_err(|e| StripeCallError::Unreachable(e.to_string()))
    }
}

/// How an off-session payment went, as far as its creation says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OffSessionPayment {
    /// Succeeded or processing: the credit waits for `payment_intent.succeeded`.
    Submitted { payment_intent: String },
    /// The card was refused, or the bank asks the customer to authenticate:
    /// Stripe's error code (`card_declined`, `authentication_required`, ...).
    Refused { code: String },
}

impl StripeApi {
    /// Charges `amount_cents` to the saved `payment_method`, off session,
    /// under the attempt's id as Stripe's idempotency key (a retried call
    /// gets the same PaymentIntent, never a second charge).
    pub async fn create_off_session_payment(
        &self,
        user_id: i64,
        attempt: uuid::Uuid,
        customer: &str,
        payment_method: &str,
        amount_cents: i64,
    ) -> Result<OffSessionPayment, StripeCallError> {
        let currency = stripe_types::Currency::from_str(&self.settings.currency)
            .map_err(|never| StripeCallError::Unreachable(format!("{never:?}")))?;
        let metadata = PaymentMetadata {
            kind: PaymentKind::AutoRecharge,
            user_id,
            amount_cents,
            attempt_id: Some(attempt),
        }
        .to_metadata();
        let request = CreatePaymentIntent::new(amount_cents, currency)
            .confirm(true)
            .off_session(CreatePaymentIntentOffSession::Bool(true))
            .customer(customer)
            .payment_method(payment_method)
            .metadata(metadata);
        let key = idempotency_key(attempt.to_string())?;
        let sent = request
            .customize()
            .request_strategy(RequestStrategy::Idempotent(key))
            .send(&self.client)
            .await;
        let intent = match sent {
            Err(StripeError::Stripe(errors, 402)) => {
                metrics::counter!(crate::telemetry::STRIPE_REQUESTS_TOTAL.name, "operation" => "create_payment_intent", "outcome" => "refused")
                    .increment(1);
                let code = errors
                    .code
                    .as_ref()
                    .map(|code| code.as_str().to_owned())
                    .unwrap_or_else(|| "card_error".to_owned());
                return Ok(OffSessionPayment::Refused { code });
            }
            other => observe("create_payment_intent", other)?,
        };
        Ok(off_session_outcome(&intent))
    }

    /// The PaymentIntent of an auto-recharge attempt, found by its metadata
    /// with Stripe's Search API (`metadata['attemptId']:'<id>'`), as its
    /// creation would have answered; `None` when Stripe has none. Search
    /// lags writes (under a minute, more during Stripe's outages): asked
    /// only long after the attempt's last call.
    pub async fn find_attempt_payment(
        &self,
        attempt: uuid::Uuid,
    ) -> Result<Option<OffSessionPayment>, StripeCallError> {
        // A UUID needs no escaping inside the quotes.
        let query = format!("metadata['attemptId']:'{attempt}'");
        let found = observe(
            "search_payment_intents",
            SearchPaymentIntent::new(query)
                .limit(10)
                .send(&self.client)
                .await,
        )?;
        // Stripe never made two for one attempt (one idempotency key);
        // should it have, a paid one is the one that counts.
        let mut intents = found.data;
        intents.sort_by_key(|intent| {
            !matches!(
                intent.status,
                PaymentIntentStatus::Succeeded | PaymentIntentStatus::Processing
            )
        });
        Ok(intents.first().map(off_session_outcome))
    }

    /// The payment method a payment intent was paid with (`None` when
    /// Stripe has no such intent): the card a top-up saved.
    pub async fn payment_method_of(
        &self,
        payment_intent: &str,
    ) -> Result<Option<String>, StripeCallError> {
        #[derive(serde::Deserialize)]
        struct PaymentIntent {
            #[serde(default)]
            payment_method: Option<String>,
        }
        let intent: Option<PaymentIntent> = self
            .retrieve("payment_intents", payment_intent, "retrieve_payment_intent")
            .await?;
        Ok(intent.and_then(|intent| intent.payment_method))
    }
}

/// What a confirmed off-session PaymentIntent says of its payment.
fn off_session_outcome(intent: &stripe_core::PaymentIntent) -> OffSessionPayment {
    match &intent.status {
        PaymentIntentStatus::Succeeded | PaymentIntentStatus::Processing => {
            OffSessionPayment::Submitted {
                payment_intent: intent.id.to_string(),
            }
        }
        PaymentIntentStatus::RequiresAction => OffSessionPayment::Refused {
            code: "authentication_required".into(),
        },
        other => OffSessionPayment::Refused {
            code: intent
                .last_payment_error
                .as_ref()
                .and_then(|error| error.code.as_ref())
                .map(|code| code.as_str().to_owned())
                .unwrap_or_else(|| format!("payment_{}", other.as_str())),
        },
    }
}

fn idempotency_key(text: String) -> Result<IdempotencyKey, StripeCallError> {
    IdempotencyKey::new(text).map_err(|e| StripeCallError::Unreachable(format!("{e:?}")))
}

fn observe<T>(
    operation: &'static str,
    result: Result<T, StripeError>,
) -> Result<T, StripeCallError> {
    let outcome = match &result {
        Ok(_) => "ok",
        Err(StripeError::Stripe(_, _)) => "refused",
        Err(_) => "unreachable",
    };
    metrics::counter!(crate::telemetry::STRIPE_REQUESTS_TOTAL.name, "operation" => operation, "outcome" => outcome)
        .increment(1);
    result.map_err(StripeCallError::from)
}
