//! A person's mailbox, as the "once per person" rules know it (the signup
//! bonus, presenting a referral code, referring oneself).
//!
//! Providers deliver many spellings of one address to the same inbox: any
//! letter case, a `+tag` after the local part, and at Gmail any dots in
//! the local part (and `googlemail.com` for `gmail.com`). Each spelling is
//! a fresh account at Clerk, so a rule keyed on the address as typed is a
//! rule one person can pass as often as they like. The canonical mailbox
//! is the one spelling all of them come down to. `sql/0012_*.sql` holds
//! the same rule in SQL for the addresses stored before it.

/// The domains whose local parts ignore dots, and the one they are read as.
const GMAIL_DOMAINS: [&str; 2] = ["gmail.com", "googlemail.com"];
const GMAIL: &str = "gmail.com";

/// The canonical mailbox of `address`: trimmed and lower-cased; the
/// `+tag` (from the first `+` of the local part on) removed, for every
/// domain; for Gmail, the dots of the local part removed and
/// `googlemail.com` read as `gmail.com`. Other domains keep their dots:
/// `j.doe@example.com` and `jdoe@example.com` may be two people. `None`
/// for an empty address.
pub fn canonical_mailbox(address: &str) -> Option<String> {
    let address = address.trim().to_lowercase();
    if address.is_empty() {
        return None;
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Some(address);
    };
    // A local part that starts with `+` is all tag: kept as it is.
    let local = match local.split_once('+') {
        Some((base, _)) if !base.is_empty() => base,
        _ => local,
    };
    if GMAIL_DOMAINS.contains(&domain) {
        let local: String = local.chars().filter(|&c| c != '.').collect();
        return Some(format!("{local}@{GMAIL}"));
    }
    Some(format!("{local}@{domain}"))
}

#[cfg(test)]
mod tests {
    use super::canonical_mailbox;

    fn canonical(address: &str) -> String {
        canonical_mailbox(address).expect("an address")
    }

    #[test]
    fn a_plus_tag_is_removed_for_every_domain() {
        assert_eq!(canonical("x+2@gmail.com"), "x@gmail.com");
        assert_eq!(canonical("ada+billing@example.com"), "ada@example.com");
        assert_eq!(canonical("ada+a+b@example.org"), "ada@example.org");
    }

    #[test]
    fn gmail_dots_are_removed_and_googlemail_is_gmail() {
        assert_eq!(canonical("j.o.h.n@gmail.com"), "john@gmail.com");
        assert_eq!(canonical("John.Doe+x@GoogleMail.com"), "johndoe@gmail.com");
        assert_eq!(canonical("johndoe@googlemail.com"), "johndoe@gmail.com");
    }

    #[test]
    fn dots_elsewhere_are_kept() {
        assert_eq!(canonical("j.doe@example.com"), "j.doe@example.com");
        assert_eq!(
            canonical("j.doe@mail.gmail.com.evil"),
            "j.doe@mail.gmail.com.evil"
        );
        assert_ne!(
            canonical("j.doe@outlook.com"),
            canonical("jdoe@outlook.com")
        );
    }

    #[test]
    fn case_and_surrounding_spaces_do_not_matter() {
        assert_eq!(canonical("  ADA@Example.COM "), "ada@example.com");
        assert_eq!(canonical("X@GMAIL.COM"), canonical("x@gmail.com"));
    }

    #[test]
    fn odd_shapes_are_kept_rather_than_emptied() {
        assert_eq!(canonical_mailbox("   "), None);
        assert_eq!(canonical("+only@example.com"), "+only@example.com");
        assert_eq!(canonical("no-at-sign"), "no-at-sign");
        // The domain is what follows the last `@`.
        assert_eq!(canonical("\"a@b\"+x@gmail.com"), "\"a@b\"@gmail.com");
    }
}
