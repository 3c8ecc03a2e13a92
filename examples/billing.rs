//! What the billing service does with kluis, through `kluis-client`: find a customer by e-mail
//! address, read their billing and payment data under `account`, read the billing data under
//! `order`, and record an order — open its processing record with the invoice number and close
//! it as `order_completed`, which starts the seven-year retention the law requires.
//!
//! It prints ids, field paths and outcomes, never the values it read.
//!
//! ```sh
//! KLUIS_TOKEN=<a billing caller token> cargo run --example billing -- <customer e-mail> [<invoice>]
//! ```
//!
//! Environment: `KLUIS_ADDR` (default `http://127.0.0.1:50051`), `KLUIS_TOKEN` (a caller of role
//! `billing`), `KLUIS_CA` (the CA certificate PEM file, for an `https://` address),
//! `KLUIS_CLIENT_CERT` and `KLUIS_CLIENT_KEY` (PEM files, for mTLS), `KLUIS_TLS_DOMAIN` (the name
//! in kluis's certificate, when the address differs), `KLUIS_CUSTOMER_EMAIL` and `KLUIS_INVOICE`
//! (instead of the arguments; the invoice defaults to `INV-<unix time>`).
//!
//! Exit status: 0 done, 1 kluis refused or failed, 2 usage, 3 no such customer.

use std::{
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use kluis_client::{Client, ClientConfig, Error, SecretString};

/// What one billing run saw: ids, paths and outcomes — no values.
#[derive(Debug)]
pub struct BillingRun {
    /// The customer's subject id.
    pub subject_id: String,
    /// Paths read under `account` (billing and payment).
    pub account_paths: Vec<&'static str>,
    /// Paths the billing role saw only masked under `account`.
    pub account_masked: Vec<String>,
    /// Paths kluis holds that `account` does not grant billing (other categories).
    pub account_withheld: Vec<String>,
    /// Paths read under `order` (billing).
    pub order_paths: Vec<&'static str>,
    /// The order's processing record was opened by this run (false: it existed already, open
    /// or — on a rerun for the same invoice — closed).
    pub record_created: bool,
    /// The record was closed by this run (false: it was closed already; the first close stands).
    pub record_closed: bool,
    /// When the order's retention runs out (seconds since the epoch).
    pub retain_until: Option<i64>,
}

/// Why a billing run stopped.
#[derive(Debug)]
pub enum RunError {
    /// No customer has this e-mail address (or billing may see none).
    NoCustomer,
    /// More than one customer has it; billing does not guess.
    Ambiguous(usize),
    /// kluis refused or failed.
    Kluis(Error),
}

impl From<Error> for RunError {
    fn from(e: Error) -> Self {
        RunError::Kluis(e)
    }
}

/// The billing flow against kluis with `client` (a `billing` token; its declared purpose does
/// not matter, each step declares its own).
pub async fn run(client: &Client, email: &str, invoice: &str) -> Result<BillingRun, RunError> {
    let account = client.with_purpose("account")?;
    let order = client.with_purpose("order")?;

    let ids = account.find_by_email(email).await?;
    let subject_id = match ids.as_slice() {
        [] => return Err(RunError::NoCustomer),
        [id] => id.clone(),
        more => return Err(RunError::Ambiguous(more.len())),
    };
    println!("customer: {subject_id}");

    let read = account
        .get_subject(&subject_id, &["billing", "payment"])
        .await?;
    println!("account: read {}", list(&read.paths()));
    println!("account: masked {}", list(&read.masked_paths()));
    println!("account: withheld {}", list(&read.withheld_paths));

    let billing = order.get_subject(&subject_id, &["billing"]).await?;
    println!("order: read {}", list(&billing.paths()));

    let record_created = match order.open_processing(&subject_id, "order", invoice).await {
        Ok(opened) => {
            println!(
                "order {invoice}: {}",
                if opened.created {
                    "processing record opened"
                } else {
                    "processing record was already open"
                }
            );
            opened.created
        }
        // kluis does not reopen a closed record: this order was completed before (a rerun).
        // Closing again below is a no-op that returns the record as it stands.
        Err(Error::FailedPrecondition { message }) => {
            println!("order {invoice}: not reopened ({message})");
            false
        }
        Err(e) => return Err(e.into()),
    };
    let closed = order
        .close_processing("order", invoice, "order_completed", None)
        .await?;
    let retain_until = closed
        .record
        .as_ref()
        .and_then(|r| r.retain_until.as_ref())
        .map(|t| t.seconds);
    println!(
        "order {invoice}: {}; retained until {}",
        if closed.closed {
            "completed"
        } else {
            "was already completed"
        },
        retain_until.map_or_else(|| "-".to_owned(), |s| format!("{s} (unix time)"))
    );

    Ok(BillingRun {
        subject_id,
        account_paths: read.paths(),
        account_masked: read.masked_paths().into_iter().map(str::to_owned).collect(),
        account_withheld: read.withheld_paths,
        order_paths: billing.paths(),
        record_created,
        record_closed: closed.closed,
        retain_until,
    })
}

fn list<S: AsRef<str>>(paths: &[S]) -> String {
    if paths.is_empty() {
        "(none)".to_owned()
    } else {
        paths
            .iter()
            .map(AsRef::as_ref)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The client from the environment (KLUIS_ADDR, KLUIS_TOKEN, KLUIS_CA, …).
fn config_from_env() -> Result<ClientConfig, String> {
    let addr = std::env::var("KLUIS_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let token = std::env::var("KLUIS_TOKEN")
        .map_err(|_| "KLUIS_TOKEN must hold a billing caller token".to_owned())?;
    let read = |var: &str| -> Result<Option<Vec<u8>>, String> {
        match std::env::var_os(var) {
            None => Ok(None),
            Some(path) => std::fs::read(&path)
                .map(Some)
                .map_err(|e| format!("{var}: cannot read {}: {e}", path.to_string_lossy())),
        }
    };
    let mut config = ClientConfig::new(addr, SecretString::from(token))
        .purpose("account")
        .timeout(Duration::from_secs(10));
    if let Some(ca) = read("KLUIS_CA")? {
        config = config.ca_certificate_pem(ca);
    }
    match (read("KLUIS_CLIENT_CERT")?, read("KLUIS_CLIENT_KEY")?) {
        (Some(cert), Some(key)) => config = config.identity_pem(cert, key),
        (None, None) => {}
        _ => return Err("KLUIS_CLIENT_CERT and KLUIS_CLIENT_KEY go together".into()),
    }
    if let Ok(domain) = std::env::var("KLUIS_TLS_DOMAIN") {
        config = config.domain_name(domain);
    }
    Ok(config)
}

/// What to tell the operator of the billing service about an error, by what went wrong.
fn explain(e: &Error) -> String {
    match e {
        Error::NotFound { .. } => {
            "the customer is not (or no longer) in kluis for billing: erased, or kept only \
             under another purpose's retention"
                .into()
        }
        Error::Unauthenticated { message } => {
            format!("kluis did not accept KLUIS_TOKEN ({message})")
        }
        Error::PermissionDenied { message } => {
            format!("kluis refused ({message}); is KLUIS_TOKEN a caller of role billing?")
        }
        Error::InvalidArgument {
            message,
            field_violations,
        } => {
            let fields: Vec<String> = field_violations
                .iter()
                .map(|v| format!("{}: {}", v.field, v.description))
                .collect();
            format!("kluis refused the input ({message}): {}", fields.join("; "))
        }
        Error::AlreadyExists { message } => {
            format!("the invoice number belongs to another customer's order ({message})")
        }
        Error::FailedPrecondition { message } => format!("kluis will not do this now: {message}"),
        Error::Transport { message } => format!("kluis is not reachable: {message}"),
        Error::Unavailable { request_id, .. }
        | Error::Internal { request_id, .. }
        | Error::DataLoss { request_id, .. } => format!(
            "kluis failed ({e}); tell its operators, quoting request id {}",
            request_id.as_deref().unwrap_or("-")
        ),
        Error::InvalidConfig { message } => format!("bad settings: {message}"),
        Error::Conflict { .. }
        | Error::ResourceExhausted { .. }
        | Error::OutOfRange { .. }
        | Error::DeadlineExceeded { .. }
        | Error::Cancelled { .. }
        | Error::Unimplemented { .. }
        | Error::Unknown { .. } => e.to_string(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(email) = args
        .next()
        .or_else(|| std::env::var("KLUIS_CUSTOMER_EMAIL").ok())
    else {
        eprintln!("usage: billing <customer e-mail> [<invoice number>]  (see examples/billing.rs)");
        return ExitCode::from(2);
    };
    let invoice = args
        .next()
        .or_else(|| std::env::var("KLUIS_INVOICE").ok())
        .unwrap_or_else(|| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            format!("INV-{now}")
        });
    let config = match config_from_env() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("billing: {message}");
            return ExitCode::from(2);
        }
    };
    let client = match config.connect().await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("billing: {}", explain(&e));
            return ExitCode::from(1);
        }
    };
    match run(&client, &email, &invoice).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(RunError::NoCustomer) => {
            eprintln!("billing: no customer with that e-mail address");
            ExitCode::from(3)
        }
        Err(RunError::Ambiguous(n)) => {
            eprintln!("billing: {n} customers share that e-mail address; resolve by subject id");
            ExitCode::from(1)
        }
        Err(RunError::Kluis(e)) => {
            eprintln!("billing: {}", explain(&e));
            ExitCode::from(1)
        }
    }
}
