//! The billing page and the demo in a real browser: headless Chromium
//! driven through ChromeDriver (WebDriver) against the real server, its
//! real PostgreSQL, and the demo's stand-ins for Clerk, Stripe and the AI
//! provider.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs
//! them): without `/usr/bin/chromedriver` (or `$CHROMEDRIVER`) these tests
//! fail, they never pass silently.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use creditd::config::{Secret, Settings};
use creditd::demo::Demo;
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use crate::support::*;

const PATIENCE: Duration = Duration::from_secs(30);
/// Longest a page may take to load before the test fails.
const PAGE_LOAD: Duration = Duration::from_secs(20);
static NEXT_PROFILE: AtomicUsize = AtomicUsize::new(0);

fn chromedriver_path() -> PathBuf {
    let path = std::env::var_os("CHROMEDRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"));
    assert!(
        path.exists(),
        "browser tests need ChromeDriver at {} (Debian: apt-get install chromium chromium-driver; \
         or set CHROMEDRIVER): refusing to skip them",
        path.display()
    );
    path
}

fn chromium_path() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned())
}

/// ChromeDriver's legacy log endpoint: the browser's console messages.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.to_owned()))
    }
}

/// One headless Chromium with its own ChromeDriver and a fresh profile.
pub(crate) struct Browser {
    pub(crate) client: Client,
    driver: tokio::process::Child,
    profile: PathBuf,
    /// Console errors seen so far (the log endpoint drains on read).
    pub(crate) errors: Vec<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

impl Browser {
    pub(crate) async fn start() -> Browser {
        let driver_path = chromedriver_path();
        let port = free_port();
        // A process group of its own: Chromium outlives a killed ChromeDriver,
        // so a failed test ends the whole group (see `Drop`).
        let driver = tokio::process::Command::new(&driver_path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver_path.display()));
        let profile = std::env::temp_dir().join(format!(
            "creditd-chromium-{}-{}",
            std::process::id(),
            NEXT_PROFILE.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&profile);
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium_path(),
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        capabilities.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(error) if started.elapsed() < PATIENCE => {
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => panic!("ChromeDriver at {url} did not start Chromium: {error}"),
            }
        };
        client
            .update_timeouts(fantoccini::wd::TimeoutConfiguration::new(
                None,
                Some(PAGE_LOAD),
                None,
            ))
            .await
            .expect("page load timeout");
        Browser {
            client,
            driver,
            profile,
            errors: Vec::new(),
        }
    }

    pub(crate) async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    pub(crate) async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Waits until `script` returns something truthy; returns it. A script
    /// that throws (the page is between two loads, say after a redirect)
    /// counts as "not yet".
    pub(crate) async fn until(&self, what: &str, script: &str) -> Value {
        let started = Instant::now();
        let mut last = Value::Null;
        while started.elapsed() < PATIENCE {
            last = match self.client.execute(script, vec![]).await {
                Ok(value) => value,
                Err(error) => Value::String(format!("(script failed: {error})")),
            };
            if matches!(&last, Value::String(s) if s.starts_with("(script failed")) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let truthy = match &last {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let page = self
            .js("return document.body ? document.body.innerText : ''")
            .await;
        panic!("timed out waiting for {what} (last value {last}); page text:\n{page}");
    }

    pub(crate) async fn click(&self, css: &str) {
        self.client
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("cannot click {css}: {e}"));
    }

    pub(crate) async fn type_into(&self, css: &str, text: &str) {
        let element = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"));
        element.clear().await.expect("clear");
        element.send_keys(text).await.expect("type");
    }

    pub(crate) async fn text(&self, css: &str) -> String {
        self.until(
            &format!("text of {css}"),
            &format!(
                "const e = document.querySelector({css:?}); return e ? e.textContent.trim() : null"
            ),
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    pub(crate) async fn url(&self) -> String {
        self.client
            .current_url()
            .await
            .expect("current url")
            .to_string()
    }

    /// Sets the `__session` cookie of `origin`, as Clerk's front end does.
    pub(crate) async fn sign_in_with_cookie(&self, origin: &str, token: String) {
        self.goto(&format!("{origin}/healthz")).await;
        self.client
            .execute(
                "document.cookie = `__session=${arguments[0]}; path=/; SameSite=Lax`; return true",
                vec![json!(token)],
            )
            .await
            .expect("set cookie");
    }

    pub(crate) async fn resize(&self, width: u32) {
        self.client
            .set_window_size(width, 900)
            .await
            .expect("window size");
    }

    /// The page fits the window: nothing wider than the viewport.
    pub(crate) async fn fits(&self, width: u32) {
        let overflow = self
            .js("return document.documentElement.scrollWidth - window.innerWidth")
            .await;
        assert!(
            overflow.as_i64().is_some_and(|o| o <= 0),
            "at {width} px the page is {overflow} px wider than the window"
        );
    }

    /// No placeholder leaked into the page's text.
    pub(crate) async fn shows_no_placeholder(&self) {
        let text = self.js("return document.body.innerText").await;
        let text = text.as_str().unwrap_or_default();
        for word in ["null", "undefined", "NaN", "[object"] {
            assert!(!text.contains(word), "the page shows `{word}`:\n{text}");
        }
    }

    /// Collects console errors since the last call.
    pub(crate) async fn collect_errors(&mut self) {
        let log = self
            .client
            .issue_cmd(BrowserLog)
            .await
            .expect("ChromeDriver's browser log");
        for entry in log.as_array().into_iter().flatten() {
            if entry["level"] == "SEVERE" {
                self.errors.push(entry["message"].to_string());
            }
        }
    }

    pub(crate) async fn assert_no_console_errors(&mut self) {
        self.collect_errors().await;
        assert!(
            self.errors.is_empty(),
            "the browser console has errors: {:#?}",
            self.errors
        );
    }

    pub(crate) async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    /// Ends ChromeDriver and the Chromium it started, passed or failed.
    fn drop(&mut self) {
        if let Some(pid) = self.driver.id().and_then(|pid| i32::try_from(pid).ok()) {
            // SAFETY: signals the process group this test created, nothing else.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

async fn balance_state(browser: &Browser) -> String {
    browser
        .until(
            "the balance to load",
            "const e = document.querySelector('credit-balance'); \
             return e && e.dataset.state && e.dataset.state !== 'loading' ? e.dataset.state : null",
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Credits `clerk_id` with `amount_micros` through the admin route.
pub(crate) async fn grant(app_url: &str, clerk_id: &str, amount_micros: i64, key: &str) {
    let response = reqwest::Client::new()
        .post(format!("{app_url}/admin/accounts/{clerk_id}/credits"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "amountMicros": amount_micros, "key": key, "reason": "test grant" }))
        .send()
        .await
        .expect("grant");
    assert!(
        response.status().is_success(),
        "grant: {}",
        response.status()
    );
}

#[actix::test]
async fn shows_the_balance_of_a_signed_in_cookie_the_low_balance_warning_and_nothing_for_byok() {
    let app = spawn_app_with(|settings: &mut Settings| {
        settings.byok.encryption_key = Secret::new(STANDARD.encode([7u8; 32]));
    })
    .await;
    app.account("user_rich").await;
    grant(&app.address, "user_rich", 12_345_678, "rich").await;
    app.account("user_poor").await;
    grant(&app.address, "user_poor", 1_500_000, "poor").await;
    let saved = app
        .http
        .put(app.url("/api/settings/api-keys"))
        .bearer_auth(app.token("user_byok"))
        .json(&json!({ "anthropicKey": "sk-ant-api03-own-key-abcdefghijWXYZ" }))
        .send()
        .await
        .expect("save key");
    assert_eq!(saved.status(), 200);

    let mut browser = Browser::start().await;
    for width in [1280, 360] {
        browser.resize(width).await;
        browser
            .sign_in_with_cookie(&app.address, app.token("user_rich"))
            .await;
        browser.goto(&app.url("/billing")).await;
        assert_eq!(balance_state(&browser).await, "ok");
        assert_eq!(
            browser.text(".credit-balance__amount").await,
            "12.34€",
            "12.345678 € shows as 12.34€ (cut, never rounded up)"
        );
        assert_eq!(browser.text(".credit-balance__topup").await, "Recharger");
        assert!(
            browser
                .js("return document.querySelector('.credit-balance__warning') === null")
                .await
                == json!(true)
        );
        browser.text(".chart__today").await;
        browser.fits(width).await;
        browser.shows_no_placeholder().await;

        browser
            .sign_in_with_cookie(&app.address, app.token("user_poor"))
            .await;
        browser.goto(&app.url("/billing")).await;
        assert_eq!(balance_state(&browser).await, "low");
        assert_eq!(browser.text(".credit-balance__amount").await, "1.50€");
        assert_eq!(
            browser.text(".credit-balance__warning").await,
            "⚠ Solde faible. Rechargez pour continuer à utiliser l'IA."
        );
        browser.fits(width).await;

        browser
            .sign_in_with_cookie(&app.address, app.token("user_byok"))
            .await;
        browser.goto(&app.url("/billing")).await;
        assert_eq!(balance_state(&browser).await, "byok");
        let visible = browser
            .js("const e = document.querySelector('credit-balance'); return e.hidden && e.getBoundingClientRect().height === 0")
            .await;
        assert_eq!(visible, json!(true), "a BYOK user sees no balance");
    }
    browser.assert_no_console_errors().await;
    browser.close().await;
}

#[actix::test]
async fn the_balance_shows_its_grants_in_spend_order_with_their_kind_and_expiry_in_french() {
    let app = spawn_app().await;
    app.account("user_grants_page").await;
    grant(&app.address, "user_grants_page", 3_000_000, "goodwill").await;
    let bonus = app
        .admin(
            reqwest::Method::POST,
            "/admin/accounts/user_grants_page/credits",
        )
        .json(&json!({
            "amountMicros": 10_000_000, "key": "bonus", "reason": "bienvenue",
            "type": "PROMO_BONUS", "expiresAt": "2030-06-15T12:00:00Z",
        }))
        .send()
        .await
        .expect("bonus");
    assert_eq!(bonus.status(), 201);

    let mut browser = Browser::start().await;
    for width in [1280, 360] {
        browser.resize(width).await;
        browser
            .sign_in_with_cookie(&app.address, app.token("user_grants_page"))
            .await;
        browser.goto(&app.url("/billing")).await;
        assert_eq!(balance_state(&browser).await, "ok");
        // The page's full balance lists them (its compact one may load first).
        let grants = browser
            .until(
                "the grants",
                "const items = [...document.querySelectorAll('.credit-balance__grant')]; \
                 return items.length ? items.map((li) => [...li.children].map((s) => s.textContent)) : null",
            )
            .await;
        assert_eq!(
            grants,
            json!([
                ["Offert", "10.00€", "expire le 15 juin 2030"],
                ["Offert", "3.00€", "n'expire pas"],
            ])
        );
        browser.fits(width).await;
    }
    browser.assert_no_console_errors().await;
    browser.close().await;
}

#[actix::test]
async fn pages_carry_a_script_policy_without_inline_code_and_no_sniffing() {
    let app = spawn_app().await;
    for path in ["/billing", "/assets/credits/credit-balance.js"] {
        let response = app.http.get(app.url(path)).send().await.expect("page");
        assert_eq!(response.status(), 200, "{path}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let policy = header("content-security-policy");
        assert!(policy.contains("script-src 'self'"), "{path}: {policy}");
        assert!(!policy.contains("unsafe-inline"), "{path}: {policy}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header("referrer-policy"), "same-origin", "{path}");
    }
    let page = app
        .http
        .get(app.url("/billing"))
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("body");
    assert!(!page.contains("<script>"), "no inline script on the page");
    let missing = app
        .http
        .get(app.url("/assets/credits/nothing.js"))
        .send()
        .await
        .expect("asset");
    assert_eq!(missing.status(), 404);
    let demo_page = app.http.get(app.url("/demo")).send().await.expect("demo");
    assert_eq!(
        demo_page.status(),
        404,
        "/demo exists only under creditd demo"
    );
}

/// A running demo, as a test sees it.
pub(crate) struct RunningDemo {
    pub(crate) url: String,
    pub(crate) sign_in_url: String,
    pub(crate) mailbox_url: String,
}

/// The demo on a test database of its own, with the admin token set so the
/// test can add history; runs until its handle stops it.
pub(crate) async fn start_demo() -> (RunningDemo, actix_web::dev::ServerHandle) {
    let db = TestDb::new().await;
    let mut settings = settings();
    settings.server.bind = "127.0.0.1:0".into();
    settings.admin.token = Secret::new(ADMIN_TOKEN);
    let storage = creditd::app::Storage::on(db.database(&settings), &settings)
        .await
        .expect("storage");
    let demo = Demo::start(settings, storage).await.expect("demo starts");
    let handle = demo.application.handle();
    let running = RunningDemo {
        url: demo.url.clone(),
        sign_in_url: demo.sign_in_url.clone(),
        mailbox_url: demo.mailbox_url.clone(),
    };
    actix_web::rt::spawn(async move {
        if let Err(error) = demo.run().await {
            eprintln!("demo stopped: {error:#}");
        }
    });
    (running, handle)
}

/// Signs in on the demo's sign-in page; lands on `/demo` with the bonus.
pub(crate) async fn demo_sign_in(browser: &Browser, demo: &RunningDemo, user: &str) {
    browser.goto(&demo.sign_in_url).await;
    assert!(
        browser.text(".demo-banner").await.contains("Démo locale"),
        "the sign-in page says it is a demo"
    );
    browser.type_into("input[name=user]", user).await;
    browser.click("button[type=submit]").await;
    browser
        .until(
            "the demo page",
            &format!(
                "return location.href.startsWith({:?})",
                format!("{}/demo", demo.url)
            ),
        )
        .await;
    browser
        .until(
            "the signup bonus on the balance",
            "const e = document.querySelector('credit-balance'); return e && e.dataset.balanceMicros === '10000000'",
        )
        .await;
}

pub(crate) async fn balance_micros(browser: &Browser) -> i64 {
    browser
        .js("return Number(document.querySelector('credit-balance').dataset.balanceMicros)")
        .await
        .as_i64()
        .expect("balance in micros")
}

#[actix::test]
async fn top_up_refuses_amounts_out_of_limits_pays_ten_euros_at_checkout_and_shows_the_credit_when_it_lands(
) {
    let (demo, handle) = start_demo().await;
    let mut browser = Browser::start().await;
    demo_sign_in(&browser, &demo, "payer").await;
    for n in 0..11 {
        grant(&demo.url, "user_demo_payer", 1_000, &format!("small-{n}")).await;
    }

    browser.goto(&format!("{}/billing", demo.url)).await;
    assert!(browser.text(".demo-banner").await.contains("Démo locale"));
    balance_state(&browser).await;
    browser.click(".credit-balance__topup").await;
    browser
        .until(
            "the dialog to open",
            "return document.querySelector('dialog.topup').open",
        )
        .await;
    assert_eq!(browser.text(".topup__pay").await, "Payer 10€");
    assert!(browser
        .text(".topup__option[data-cents='1000']")
        .await
        .contains("Populaire"));

    browser.type_into(".topup__custom", "4").await;
    assert_eq!(browser.text(".topup__pay").await, "Payer 4€");
    browser.click(".topup__pay").await;
    assert_eq!(browser.text(".topup__error").await, "Minimum 5€");
    browser.type_into(".topup__custom", "1000.01").await;
    browser.click(".topup__pay").await;
    assert_eq!(browser.text(".topup__error").await, "Maximum 1000€");
    assert!(
        browser.url().await.starts_with(&demo.url),
        "refused amounts stay in the dialog"
    );

    browser
        .client
        .active_element()
        .await
        .expect("focus")
        .send_keys("\u{e00c}")
        .await
        .expect("escape");
    browser
        .until(
            "Escape to close the dialog",
            "return !document.querySelector('dialog.topup').open",
        )
        .await;
    assert_eq!(
        browser
            .js("return document.activeElement.classList.contains('credit-balance__topup')")
            .await,
        json!(true),
        "focus goes back to the button that opened the dialog"
    );

    browser.click(".credit-balance__topup").await;
    browser.click(".topup__option[data-cents='1000']").await;
    browser.click(".topup__pay").await;
    browser
        .until(
            "the Checkout page",
            "return document.querySelector('.checkout') !== null",
        )
        .await;
    browser.click(".checkout__cancel").await;
    browser
        .until(
            "back on /billing?topup=canceled",
            &format!(
                "return location.href === {:?}",
                format!("{}/billing?topup=canceled", demo.url)
            ),
        )
        .await;
    assert_eq!(
        browser.text("#topup-status").await,
        "Paiement annulé : aucun montant n'a été débité."
    );
    assert_eq!(balance_state(&browser).await, "ok");
    assert_eq!(
        balance_micros(&browser).await,
        10_011_000,
        "nothing charged, nothing credited"
    );

    browser.click(".credit-balance__topup").await;
    browser.type_into(".topup__custom", "").await;
    browser.click(".topup__option[data-cents='1000']").await;
    assert_eq!(browser.text(".topup__pay").await, "Payer 10€");
    browser.click(".topup__pay").await;
    browser
        .until(
            "the Checkout page",
            "return document.querySelector('.checkout') !== null",
        )
        .await;
    assert!(browser.url().await.contains("/c/pay/cs_test_demo_"));
    assert_eq!(
        browser
            .js("return document.querySelector('.checkout').dataset.amountCents")
            .await,
        json!("1000")
    );
    browser.click(".checkout__pay").await;

    browser
        .until(
            "back on /billing?topup=success",
            &format!(
                "return location.href === {:?}",
                format!("{}/billing?topup=success", demo.url)
            ),
        )
        .await;
    browser
        .js("window.stillTheSamePage = true; return true")
        .await;
    browser
        .until(
            "the payment confirmation",
            "const s = document.getElementById('topup-status'); return s && s.dataset.state === 'confirmed'",
        )
        .await;
    browser
        .until(
            "the credit on the balance",
            "return document.querySelector('credit-balance').dataset.balanceMicros === '20011000'",
        )
        .await;
    assert_eq!(browser.text(".credit-balance__amount").await, "20.01€");
    assert_eq!(
        browser.js("return window.stillTheSamePage === true").await,
        json!(true),
        "the balance moved without a reload"
    );

    browser
        .until(
            "the top-up first in the history",
            "const r = document.querySelector('[data-tab=transactions] .history__row'); return r && r.dataset.type === 'TOP_UP'",
        )
        .await;
    assert_eq!(
        browser
            .text("[data-tab=transactions] .history__row .history__badge")
            .await,
        "Recharge"
    );
    assert_eq!(
        browser
            .text("[data-tab=transactions] .history__row .history__amount")
            .await,
        "+10.00€"
    );
    // The invoice link is read after the credit (the top-up's follow-up);
    // the page shows it once it is there.
    browser
        .until(
            "the top-up's invoice link",
            "return !!document.querySelector('[data-tab=transactions] .history__row .history__invoice')",
        )
        .await;
    assert_eq!(
        browser
            .text("[data-tab=transactions] .history__row .history__invoice")
            .await,
        "Facture"
    );
    let invoice = browser
        .js("return document.querySelector('[data-tab=transactions] .history__row .history__invoice').href")
        .await;
    let invoice = invoice.as_str().unwrap_or_default().to_owned();
    assert!(invoice.contains("/i/in_demo_"), "{invoice}");
    let page = reqwest::get(&invoice).await.expect("the invoice page");
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.unwrap_or_default().contains("Facture"));
    let rows = "return document.querySelectorAll('[data-tab=transactions] .history__row').length";
    assert_eq!(browser.js(rows).await, json!(10));
    browser
        .click("[data-tab=transactions] .history__more")
        .await;
    browser
        .until("the second page", &format!("{rows} === 13"))
        .await;
    assert_eq!(
        browser
            .js("return document.querySelector('[data-tab=transactions] .history__more').hidden")
            .await,
        json!(true),
        "no more pages after the last"
    );
    browser.resize(360).await;
    browser.fits(360).await;
    browser.assert_no_console_errors().await;
    browser.close().await;
    handle.stop(true).await;
}

#[actix::test]
async fn demo_signs_in_grants_the_bonus_charges_a_chat_and_tops_up() {
    let (demo, handle) = start_demo().await;
    let mut browser = Browser::start().await;
    demo_sign_in(&browser, &demo, "alice").await;
    assert_eq!(balance_micros(&browser).await, 10_000_000);

    browser
        .type_into(".chat__input", "Une application de notes, s'il te plaît.")
        .await;
    browser.click(".chat__send").await;
    let used = browser
        .until(
            "the chat's answer",
            "const m = document.querySelector('.chat__message.is-assistant'); return m ? Number(m.dataset.usedMicros) : null",
        )
        .await
        .as_i64()
        .expect("used micros");
    assert!(used > 0, "a chat on the platform's key is charged");
    assert!(browser
        .text(".chat__message.is-assistant")
        .await
        .starts_with("Écho : Une application de notes"));
    browser
        .until(
            "the balance to drop by the charge",
            &format!("return Number(document.querySelector('credit-balance').dataset.balanceMicros) === {}", 10_000_000 - used),
        )
        .await;

    browser.goto(&format!("{}/billing", demo.url)).await;
    let today = browser
        .until(
            "today's spend on the chart",
            "const t = document.querySelector('.chart__today'); return t ? t.dataset.costMicros : null",
        )
        .await;
    assert_eq!(today, json!(used.to_string()));
    let bars = browser
        .js("return document.querySelectorAll('.chart__bar').length")
        .await;
    assert_eq!(bars, json!(30), "30 days, days without use included");
    browser.shows_no_placeholder().await;
    browser.click("#history-tab-usages").await;
    assert_eq!(
        browser
            .text("[data-tab=usages] .history__row .history__label")
            .await,
        "demo-echo"
    );

    browser.click(".credit-balance__topup").await;
    browser.click(".topup__option[data-cents='500']").await;
    browser.click(".topup__pay").await;
    browser.click(".checkout__pay").await;
    browser
        .until(
            "the balance to rise by the top-up",
            &format!("return Number(document.querySelector('credit-balance').dataset.balanceMicros) === {}", 15_000_000 - used),
        )
        .await;
    if let Some(path) = std::env::var_os("CREDITD_SCREENSHOT") {
        let width = std::env::var("CREDITD_SCREENSHOT_WIDTH")
            .ok()
            .and_then(|width| width.parse().ok())
            .unwrap_or(1100);
        // Tall enough to show the whole page in one picture (a narrow
        // window needs more: CREDITD_SCREENSHOT_HEIGHT).
        let height = std::env::var("CREDITD_SCREENSHOT_HEIGHT")
            .ok()
            .and_then(|height| height.parse().ok())
            .unwrap_or(2600);
        browser
            .client
            .set_window_size(width, height)
            .await
            .expect("window size");
        browser.goto(&format!("{}/billing", demo.url)).await;
        balance_state(&browser).await;
        browser.text(".chart__today").await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let png = browser.client.screenshot().await.expect("screenshot");
        std::fs::write(&path, png).expect("write the screenshot");
    }
    browser.assert_no_console_errors().await;
    browser.close().await;
    handle.stop(true).await;
}

#[actix::test]
async fn demo_refuses_real_keys_and_addresses_beyond_loopback() {
    let db = TestDb::new().await;
    let mut settings = settings();
    settings.server.bind = "127.0.0.1:0".into();
    settings.stripe.secret_key = Secret::new("sk_live_real");
    let storage = creditd::app::Storage::on(db.database(&settings), &settings)
        .await
        .expect("storage");
    let refused = Demo::start(settings.clone(), storage)
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{refused:#}").contains("stripe.secret_key"),
        "{refused:#}"
    );
    assert!(
        !format!("{refused:#}").contains("sk_live_real"),
        "never prints a secret"
    );

    settings.stripe.secret_key = Secret::default();
    settings.events.webhook_url = "https://hooks.example.com/creditd".into();
    settings.events.signing_secret = Secret::new("whsec_real_events_secret");
    let storage = creditd::app::Storage::on(db.database(&settings), &settings)
        .await
        .expect("storage");
    let refused = Demo::start(settings.clone(), storage)
        .await
        .err()
        .expect("refused");
    let message = format!("{refused:#}");
    assert!(
        message.contains("events.webhook_url") && message.contains("events.signing_secret"),
        "{message}"
    );
    assert!(
        !message.contains("whsec_real_events_secret"),
        "never prints a secret"
    );

    settings.events.webhook_url = String::new();
    settings.events.signing_secret = Secret::default();
    settings.server.bind = "0.0.0.0:0".into();
    let storage = creditd::app::Storage::on(db.database(&settings), &settings)
        .await
        .expect("storage");
    let refused = Demo::start(settings, storage).await.err().expect("refused");
    assert!(format!("{refused:#}").contains("loopback"), "{refused:#}");
}

#[actix::test]
async fn demo_echo_model_streams_server_sent_events_and_is_charged_for_them() {
    let (demo, handle) = start_demo().await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let signed_in = http
        .post(&demo.sign_in_url)
        .form(&[("user", "streamer")])
        .send()
        .await
        .expect("sign in");
    assert_eq!(signed_in.status(), 303);
    let cookie = signed_in
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("the __session cookie")
        .to_owned();
    assert!(cookie.starts_with("__session="), "{cookie}");
    let refused = http
        .post(&demo.sign_in_url)
        .form(&[("user", "<script>")])
        .send()
        .await
        .expect("sign in");
    assert_eq!(
        refused.status(),
        400,
        "a user name is letters, digits, _ or -"
    );

    let post = |path: &str, body: Value| {
        http.post(format!("{}{path}", demo.url))
            .header("Cookie", &cookie)
            .header("Origin", &demo.url)
            .json(&body)
            .send()
    };
    let bonus = post("/api/credits/claim-bonus", json!({}))
        .await
        .expect("bonus");
    assert_eq!(bonus.status(), 201);
    let stream = post(
        "/api/chat",
        json!({ "model": "demo-echo", "stream": true, "maxTokens": 64,
                "messages": [{ "role": "user", "content": "Bonjour le flux" }] }),
    )
    .await
    .expect("chat");
    assert_eq!(stream.status(), 200);
    let text = stream.text().await.expect("events");
    assert!(text.contains("event: delta"), "{text}");
    let done = text
        .split("event: done\ndata: ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap_or_else(|| panic!("no done event in {text}"));
    let done: Value = serde_json::from_str(done).expect("done is JSON");
    let used = done["credits"]["usedMicros"].as_i64().expect("usedMicros");
    assert!(used > 0, "{done}");
    assert!(
        done["credits"]["outputTokens"].as_i64().unwrap_or(0) > 0,
        "{done}"
    );

    let overview = http
        .get(format!("{}/api/credits", demo.url))
        .header("Cookie", &cookie)
        .send()
        .await
        .expect("balance")
        .json::<Value>()
        .await
        .expect("JSON");
    assert_eq!(overview["balanceMicros"], json!(10_000_000 - used));
    handle.stop(true).await;
}

#[actix::test]
async fn auto_recharge_saved_on_the_billing_page_recharges_the_demo_card_once_a_chat_crosses_the_threshold(
) {
    let (demo, handle) = start_demo().await;
    let mut browser = Browser::start().await;
    demo_sign_in(&browser, &demo, "bob").await;

    browser.goto(&format!("{}/billing", demo.url)).await;
    // Before any top-up there is no card to charge: saving says so.
    browser
        .until(
            "the auto-recharge settings",
            "return document.querySelector('credit-auto-recharge').dataset.enabled === 'false'",
        )
        .await;
    browser.click(".auto-recharge__enabled").await;
    browser.click(".auto-recharge__save").await;
    assert!(
        browser
            .text(".auto-recharge__error")
            .await
            .contains("saved card"),
        "enabling without a card is refused"
    );
    // The browser logs that refusal (a 409 answer) as a failed load: expected.
    browser.collect_errors().await;
    browser
        .errors
        .retain(|error| !error.contains("auto-recharge") || !error.contains("409"));

    browser.click(".credit-balance__topup").await;
    browser.click(".topup__option[data-cents='500']").await;
    browser.click(".topup__pay").await;
    browser.click(".checkout__pay").await;
    browser
        .until(
            "the top-up's credit",
            "return Number(document.querySelector('credit-balance').dataset.balanceMicros) === 15000000",
        )
        .await;
    // The card is saved by the top-up's follow-up, a moment after the
    // credit, which the balance stream shows at once: reload until it is.
    let started = Instant::now();
    loop {
        browser.goto(&format!("{}/billing", demo.url)).await;
        browser
            .until(
                "the auto-recharge settings",
                "return 'enabled' in document.querySelector('credit-auto-recharge').dataset",
            )
            .await;
        let saved = browser
            .js("const e = document.querySelector('credit-auto-recharge'); return e.dataset.enabled === 'false' && e.querySelector('.auto-recharge__notice').hidden")
            .await;
        if saved == json!(true) {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "timed out waiting for the saved card"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    browser
        .js("document.querySelector('.auto-recharge__enabled').checked = true")
        .await;
    browser.type_into(".auto-recharge__threshold", "15").await;
    browser.type_into(".auto-recharge__amount", "20").await;
    browser.click(".auto-recharge__save").await;
    browser
        .until(
            "the saved settings",
            "return document.querySelector('credit-auto-recharge').dataset.enabled === 'true'",
        )
        .await;

    browser.goto(&format!("{}/demo", demo.url)).await;
    browser
        .until(
            "the chat's input",
            "return document.querySelector('.chat__input') !== null",
        )
        .await;
    browser.type_into(".chat__input", "Un agenda.").await;
    browser.click(".chat__send").await;
    let used = browser
        .until(
            "the chat's answer",
            "const m = document.querySelector('.chat__message.is-assistant'); return m ? Number(m.dataset.usedMicros) : null",
        )
        .await
        .as_i64()
        .expect("used micros");
    browser.goto(&format!("{}/billing", demo.url)).await;
    browser
        .until(
            "the auto-recharge's credit",
            &format!(
                "document.querySelector('credit-balance').refresh(); return Number(document.querySelector('credit-balance').dataset.balanceMicros) === {}",
                35_000_000 - used
            ),
        )
        .await;
    browser.goto(&format!("{}/billing", demo.url)).await;
    assert!(browser
        .text(".auto-recharge__month")
        .await
        .starts_with("Ce mois-ci : 20€ rechargés automatiquement"));
    browser.assert_no_console_errors().await;
    browser.close().await;
    handle.stop(true).await;
}

#[actix::test]
async fn the_billing_page_sets_spending_limits_under_the_ceiling_and_takes_a_friends_referral_code()
{
    let app = spawn_app().await;
    app.account("user_limits").await;
    let ceiling = app
        .admin(reqwest::Method::PUT, "/admin/accounts/user_limits/limits")
        .json(&json!({ "dailyCeilingMicros": 4_000_000 }))
        .send()
        .await
        .expect("ceiling");
    assert_eq!(ceiling.status(), 200);
    let (_, friend) = json_of(app.get_as("user_friend", "/api/credits/referral").await).await;
    let friend_code = friend["code"].as_str().expect("code").to_owned();

    let mut browser = Browser::start().await;
    browser.resize(360).await;
    browser
        .sign_in_with_cookie(&app.address, app.token("user_limits"))
        .await;
    browser.goto(&app.url("/billing")).await;
    let daily = browser.text(".limits__spent[data-window=\"daily\"]").await;
    assert!(
        daily.starts_with("0.00€ dépensés sur 4.00€ · remise à zéro le "),
        "the ceiling is the daily limit: {daily}"
    );
    let ceiling = browser.text(".limits__ceiling").await;
    assert!(ceiling.contains("4.00€"), "{ceiling}");

    browser.type_into("#limits-daily", "3,50").await;
    browser.click(".limits__save").await;
    assert_eq!(
        browser.text(".limits__status").await,
        "Limites enregistrées."
    );
    let (_, stored) = json_of(app.get_as("user_limits", "/api/credits/limits").await).await;
    assert_eq!(stored["dailyMicros"], 3_500_000);
    assert_eq!(stored["monthlyMicros"], Value::Null);

    browser.type_into("#limits-daily", "5").await;
    browser.click(".limits__save").await;
    browser
        .until(
            "the ceiling's refusal",
            "return document.querySelector('.limits__status')?.textContent === \
             'Cette limite dépasse le plafond fixé par un administrateur.'",
        )
        .await;
    let (_, unchanged) = json_of(app.get_as("user_limits", "/api/credits/limits").await).await;
    assert_eq!(unchanged["dailyMicros"], 3_500_000);

    let (_, own) = json_of(app.get_as("user_limits", "/api/credits/referral").await).await;
    assert_eq!(
        browser.text(".referral__code").await,
        own["code"].as_str().unwrap()
    );
    browser.type_into("#referral-code", "ZZZZZZZZ").await;
    browser.click(".referral__submit").await;
    assert_eq!(
        browser.text(".referral__status").await,
        "Ce code de parrainage est inconnu."
    );
    browser
        .type_into("#referral-code", &friend_code.to_lowercase())
        .await;
    browser.click(".referral__submit").await;
    browser.text(".referral__referred").await;
    let (_, friend) = json_of(app.get_as("user_friend", "/api/credits/referral").await).await;
    assert_eq!(friend["referredCount"], 1);
    browser.fits(360).await;
    browser.shows_no_placeholder().await;
    // Chromium logs the two refusals asked for above; nothing else.
    browser.collect_errors().await;
    browser.errors.retain(|error| {
        !(error.contains("/api/credits/limits") && error.contains("409")
            || error.contains("/api/credits/referral") && error.contains("404"))
    });
    browser.assert_no_console_errors().await;
    browser.close().await;
}

#[actix::test]
async fn the_auto_recharge_element_says_in_french_why_creditd_switched_it_off() {
    let app = spawn_app().await;
    let client = app.db.client().await;
    let cases = [
        ("user_off_dispute", "dispute", "fait l'objet d'un litige"),
        ("user_off_refunded", "refunded", "a été remboursée"),
    ];
    for (user, reason, _) in cases {
        let account = app.account(user).await;
        client
            .execute(
                "INSERT INTO auto_recharge_settings
                        (user_id, enabled, threshold_cents, amount_cents, disabled_reason, updated_at)
                 VALUES ($1, false, 500, 2000, $2, now())",
                &[&account.0, &reason],
            )
            .await
            .expect("settings");
    }

    let mut browser = Browser::start().await;
    for (user, _, words) in cases {
        browser
            .sign_in_with_cookie(&app.address, app.token(user))
            .await;
        browser.goto(&app.url("/billing")).await;
        let notice = browser
            .until(
                "the auto-recharge notice",
                "const n = document.querySelector('.auto-recharge__notice'); \
                 return n && !n.hidden ? n.textContent : null",
            )
            .await;
        let notice = notice.as_str().unwrap_or_default();
        assert!(
            notice.starts_with("Recharge automatique désactivée : ") && notice.contains(words),
            "{user}: {notice}"
        );
    }
    browser.assert_no_console_errors().await;
    browser.close().await;
}

/// `assets/credits/` as it is on disk: every file, with the content type
/// its extension calls for.
fn asset_files() -> Vec<(String, &'static str)> {
    let directory = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/credits");
    let mut files: Vec<(String, &'static str)> = std::fs::read_dir(&directory)
        .expect("the assets directory")
        .map(|entry| {
            let name = entry
                .expect("an asset")
                .file_name()
                .into_string()
                .expect("a UTF-8 name");
            let content_type = match name.rsplit_once('.').map(|(_, extension)| extension) {
                Some("js") => "text/javascript; charset=utf-8",
                Some("css") => "text/css; charset=utf-8",
                _ => panic!("{name}: no content type is expected for this extension"),
            };
            (name, content_type)
        })
        .collect();
    files.sort();
    files
}

#[actix::test]
async fn every_file_of_the_assets_directory_is_served_with_its_content_type_and_nothing_else_is() {
    let app = spawn_app().await;
    let files = asset_files();
    assert!(
        files.len() >= 11,
        "the elements, the page script and the stylesheet: {files:?}"
    );
    for (name, content_type) in &files {
        let response = app
            .http
            .get(app.url(&format!("/assets/credits/{name}")))
            .send()
            .await
            .expect("asset");
        assert_eq!(response.status(), 200, "{name}");
        let header = |header: &str| {
            response
                .headers()
                .get(header)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(header("content-type"), *content_type, "{name}");
        assert_eq!(header("cache-control"), "no-cache", "{name}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{name}");
        let on_disk = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("assets/credits")
                .join(name),
        )
        .expect("the file on disk");
        assert_eq!(
            response.bytes().await.expect("body").as_ref(),
            on_disk,
            "{name}"
        );
    }
    for path in [
        "/assets/credits/nothing.js",
        "/assets/credits/billing.html",
        "/assets/billing.html",
        "/assets/credits/..%2Fbilling.html",
        "/assets/credits/%2E%2E%2F%2E%2E%2FCargo.toml",
        "/assets/credits/",
    ] {
        let response = app.http.get(app.url(path)).send().await.expect("asset");
        assert_eq!(response.status(), 404, "{path} is not an asset");
    }
}

#[actix::test]
async fn an_element_alone_on_a_bare_page_arrives_styled_and_follows_its_attributes() {
    let app = spawn_app().await;
    app.account("user_alone").await;
    let mut browser = Browser::start().await;
    browser
        .sign_in_with_cookie(&app.address, app.token("user_alone"))
        .await;
    // A page of creditd's origin without its stylesheet: only the element's module.
    let loaded = browser
        .js("document.head.replaceChildren(); \
             document.body.replaceChildren(); \
             const chart = document.createElement('credit-usage-chart'); \
             chart.setAttribute('days', '30'); \
             document.body.append(chart); \
             return import('/assets/credits/credit-usage-chart.js').then(() => \
               document.styleSheets.length === 0 && customElements.get('credit-usage-chart') !== undefined)")
        .await;
    assert_eq!(loaded, json!(true), "no stylesheet but the element's own");
    browser
        .until(
            "thirty days drawn",
            "return document.querySelectorAll('credit-usage-chart .chart__bar').length === 30",
        )
        .await;
    let styled = browser
        .js("const chart = document.querySelector('credit-usage-chart'); \
             const own = getComputedStyle(chart); \
             const svg = getComputedStyle(chart.querySelector('.chart__svg')); \
             return [own.display, own.borderTopStyle, own.borderTopLeftRadius, svg.backgroundColor, svg.height]")
        .await;
    assert_eq!(
        styled,
        json!(["block", "solid", "9.6px", "rgb(246, 248, 250)", "128px"]),
        "the element's card, and its chart on the theme's default background"
    );
    browser
        .js("document.querySelector('credit-usage-chart').setAttribute('days', '7'); return true")
        .await;
    browser
        .until(
            "the chart redrawn over seven days",
            "const chart = document.querySelector('credit-usage-chart'); \
             return chart.querySelectorAll('.chart__bar').length === 7 \
               && chart.querySelector('h2').textContent === 'Dépenses par jour (7 derniers jours)'",
        )
        .await;
    browser.assert_no_console_errors().await;
    browser.close().await;
}

#[actix::test]
async fn the_billing_page_shows_a_top_ups_credit_through_the_balance_stream_with_polling_disabled()
{
    let stripe = crate::support::stripe::spawn_stripe_app().await;
    let app = &stripe.app;
    app.account("user_live").await;
    grant(&app.address, "user_live", 2_000_000, "first").await;

    let mut browser = Browser::start().await;
    browser
        .sign_in_with_cookie(&app.address, app.token("user_live"))
        .await;
    browser.goto(&app.url("/billing?topup=success")).await;
    assert_eq!(balance_state(&browser).await, "ok");
    // No polling: only the stream can bring the credit (and the
    // confirmation waits for the balance to change).
    browser
        .js("const e = document.querySelector('credit-balance'); \
             e.setAttribute('poll-interval', '0'); window.streamed = []; \
             e.addEventListener('credit-balance:changed', (event) => window.streamed.push(event.detail.balanceMicros)); \
             return true")
        .await;
    browser
        .until(
            "the balance stream to open",
            "return document.querySelector('credit-balance').dataset.live === 'stream'",
        )
        .await;
    browser
        .until(
            "the confirmation to wait",
            "return document.getElementById('topup-status').dataset.state === 'pending'",
        )
        .await;

    crate::stripe::top_up(&stripe, "user_live", "cs_live_stream", 1000).await;

    browser
        .until(
            "the top-up's credit on the balance",
            "return document.querySelector('.credit-balance__amount').textContent === '12.00€'",
        )
        .await;
    browser
        .until(
            "the payment confirmed",
            "return document.getElementById('topup-status').dataset.state === 'confirmed'",
        )
        .await;
    assert_eq!(
        browser
            .js("return window.streamed.includes(12000000)")
            .await,
        json!(true),
        "the credit came through the stream"
    );
    assert_eq!(
        browser
            .js("return document.querySelector('credit-balance').dataset.live")
            .await,
        json!("stream")
    );
    browser.assert_no_console_errors().await;
    browser.close().await;
}

#[actix::test]
async fn the_billing_page_makes_an_api_key_shows_its_secret_once_and_revokes_it() {
    let app = spawn_app().await;
    app.account("user_key_page").await;
    let mut browser = Browser::start().await;
    browser.resize(360).await;
    browser
        .sign_in_with_cookie(&app.address, app.token("user_key_page"))
        .await;
    browser.goto(&app.url("/billing")).await;
    assert_eq!(
        browser.text(".api-keys__empty").await,
        "Aucune clé API pour le moment."
    );

    browser.click(".api-keys__create").await;
    assert!(browser.text(".api-keys__status").await.starts_with("Nom :"));
    browser
        .type_into("#api-key-name", "Mon app de tâches")
        .await;
    browser.type_into("#api-key-limit", "12,50").await;
    browser.click(".api-keys__create").await;
    let secret = browser.text(".api-keys__secret").await;
    assert!(secret.starts_with("cd_") && secret.len() == 46, "{secret}");
    let usage = browser.text(".api-keys__usage").await;
    assert!(usage.starts_with("0.00€ dépensés sur 12.50€"), "{usage}");
    let (_, keys) = json_of(app.get_as("user_key_page", "/api/credits/api-keys").await).await;
    assert_eq!(keys["keys"][0]["name"], "Mon app de tâches");
    assert_eq!(keys["keys"][0]["spendLimitMicros"], 12_500_000);
    let models = |key: String| {
        let app = &app;
        async move {
            app.http
                .get(app.url("/v1/models"))
                .bearer_auth(key)
                .send()
                .await
                .expect("models")
                .status()
        }
    };
    assert_eq!(models(secret.clone()).await, 200);

    // A reload lists the key, never its secret again.
    browser.goto(&app.url("/billing")).await;
    browser.text(".api-keys__name").await;
    let page = browser.js("return document.body.innerText").await;
    assert!(!page.as_str().unwrap().contains(&secret));

    browser.click(".api-keys__revoke").await;
    browser.text(".api-keys__empty").await;
    assert_eq!(models(secret).await, 401);
    browser.fits(360).await;
    browser.shows_no_placeholder().await;
    browser.assert_no_console_errors().await;
    browser.close().await;
}
