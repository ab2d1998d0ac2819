//! Stored text: the characters creditd refuses in whatever it keeps.
//!
//! Identifiers and free text that end up in PostgreSQL (a conversation or
//! message id, a model name, an admin's key and reason, a referral code, a
//! Clerk user's names, a Stripe or Svix id) are read back later by people:
//! on the billing page, in the admin view, in logs and exports. An
//! invisible character there misleads whoever reads it: U+202E (right-to-
//! left override) shows `gpj.exe` as `exe.jpg`, U+200B (zero width space)
//! makes two ids that look the same differ, U+2066..U+2069 isolates reorder
//! what follows them. So every stored text refuses, with a 400 naming its
//! field, the characters of these general categories:
//!
//! - **Cc**, the controls: U+0000..U+001F and U+007F..U+009F (NUL, BEL,
//!   ESC, tabs and newlines);
//! - **Cf**, the format characters: invisible, they change how the text
//!   around them shows or joins. Unicode 15.1 to 18.0 list 170 of them in
//!   21 ranges: U+00AD, U+0600..U+0605, U+061C, U+06DD, U+070F,
//!   U+0890..U+0891, U+08E2, U+180E, U+200B..U+200F, U+202A..U+202E,
//!   U+2060..U+2064, U+2066..U+206F, U+FEFF, U+FFF9..U+FFFB, U+110BD,
//!   U+110CD, U+13430..U+1343F, U+1BCA0..U+1BCA3, U+1D173..U+1D17A,
//!   U+E0001, U+E0020..U+E007F;
//! - **Zl** and **Zp**: U+2028 LINE SEPARATOR and U+2029 PARAGRAPH
//!   SEPARATOR, line breaks that JavaScript and log viewers honour.
//!
//! The categories are read from `unicode-properties` (unicode-rs, Unicode
//! 18.0 tables), which the build already compiles, with this feature, for
//! PostgreSQL's SASLprep (`tokio-postgres` → `stringprep`): no new code to
//! build, and a table kept current by its maintainers rather than copied
//! here. One consequence worth knowing: U+200D ZERO WIDTH JOINER is Cf, so
//! an emoji sequence joined by it (👨‍👩‍👧) is refused in a stored name too.

use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// Whether `c` may not be stored (Cc, Cf, Zl or Zp).
pub fn is_refused(c: char) -> bool {
    matches!(
        c.general_category(),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    )
}

/// The first character of `value` that may not be stored, if any.
pub fn refused_in(value: &str) -> Option<char> {
    value.chars().find(|&c| is_refused(c))
}

/// Why `value` may not be stored, naming the character by its code point
/// (it is invisible), or `None`.
pub fn problem(value: &str) -> Option<String> {
    refused_in(value).map(|c| {
        format!(
            "must not contain control or invisible formatting characters (found U+{:04X})",
            u32::from(c)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Cf ranges of Unicode 15.1 to 18.0, as listed in the module doc.
    const FORMAT_RANGES: [(u32, u32); 21] = [
        (0x00AD, 0x00AD),
        (0x0600, 0x0605),
        (0x061C, 0x061C),
        (0x06DD, 0x06DD),
        (0x070F, 0x070F),
        (0x0890, 0x0891),
        (0x08E2, 0x08E2),
        (0x180E, 0x180E),
        (0x200B, 0x200F),
        (0x202A, 0x202E),
        (0x2060, 0x2064),
        (0x2066, 0x206F),
        (0xFEFF, 0xFEFF),
        (0xFFF9, 0xFFFB),
        (0x110BD, 0x110BD),
        (0x110CD, 0x110CD),
        (0x13430, 0x1343F),
        (0x1BCA0, 0x1BCA3),
        (0x1D173, 0x1D17A),
        (0xE0001, 0xE0001),
        (0xE0020, 0xE007F),
    ];

    fn chars(from: u32, to: u32) -> impl Iterator<Item = char> {
        (from..=to).filter_map(char::from_u32)
    }

    #[test]
    fn every_format_character_of_the_documented_ranges_is_refused() {
        let mut count = 0;
        for (from, to) in FORMAT_RANGES {
            for c in chars(from, to) {
                assert!(is_refused(c), "U+{:04X} is Cf", u32::from(c));
                count += 1;
            }
        }
        assert_eq!(count, 170);
    }

    #[test]
    fn controls_and_the_line_and_paragraph_separators_are_refused() {
        for c in chars(0x00, 0x1F).chain(chars(0x7F, 0x9F)) {
            assert!(is_refused(c), "U+{:04X} is Cc", u32::from(c));
        }
        assert!(is_refused('\u{2028}'));
        assert!(is_refused('\u{2029}'));
    }

    #[test]
    fn the_characters_people_write_are_kept() {
        for text in [
            "conv_42-a.b:c/d",
            "Élodie Brontë-Ñúñez",
            "王小明",
            "محمد",
            "support goodwill — 10 € offerts",
            "🙂",
            "a\u{00A0}b\u{202F}c",
        ] {
            assert_eq!(refused_in(text), None, "{text}");
        }
    }

    #[test]
    fn the_problem_names_the_invisible_character_by_its_code_point() {
        assert_eq!(
            problem("conv\u{202E}gpj.exe").as_deref(),
            Some("must not contain control or invisible formatting characters (found U+202E)")
        );
        assert_eq!(problem("conv_1"), None);
    }
}
