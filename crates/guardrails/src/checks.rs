//! Check digits and number plans: what turns a shape into a finding.

/// Luhn (mod 10) over ASCII digits.
pub(crate) fn luhn_ok(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (idx, &byte) in digits.iter().rev().enumerate() {
        let mut digit = u32::from(byte - b'0');
        if idx % 2 == 1 {
            digit *= 2;
            if digit > 9 {
                digit -= 9;
            }
        }
        sum += digit;
    }
    sum.is_multiple_of(10)
}

/// Whether the issuer prefix of a card number fits its length. Numbers of issuers not listed
/// (UATP, numbers starting with 0, 1, 7, 8, 9) are not cards here: Luhn alone passes one random
/// number in ten, and the prefix is what keeps order numbers out.
pub(crate) fn card_prefix_ok(digits: &[u8]) -> bool {
    let len = digits.len();
    let prefix = |n: usize| -> u32 { digits[..n].iter().fold(0, |acc, &b| acc * 10 + u32::from(b - b'0')) };
    if len < 13 {
        return false;
    }
    match digits[0] {
        // Visa.
        b'4' => matches!(len, 13 | 16 | 19),
        // Mastercard 51-55; Maestro 50, 56-59.
        b'5' => match prefix(2) {
            51..=55 => len == 16,
            _ => true,
        },
        // Mastercard 2221-2720; Mir 2200-2204.
        b'2' => matches!(prefix(4), 2221..=2720 | 2200..=2204) && len == 16,
        b'3' => match prefix(2) {
            // American Express.
            34 | 37 => len == 15,
            // JCB 3528-3589.
            35 => (3528..=3589).contains(&prefix(4)) && len >= 16,
            // Diners Club.
            30 => (300..=305).contains(&prefix(3)) && len >= 14,
            36 | 38 | 39 => len >= 14,
            _ => false,
        },
        // Discover, UnionPay, Maestro, RuPay.
        b'6' => len >= 16,
        _ => false,
    }
}

/// IBAN lengths by country (SWIFT IBAN registry). A country not listed is not an IBAN.
const IBAN_LENGTHS: &[(&str, usize)] = &[
    ("AD", 24),
    ("AE", 23),
    ("AL", 28),
    ("AT", 20),
    ("AZ", 28),
    ("BA", 20),
    ("BE", 16),
    ("BG", 22),
    ("BH", 22),
    ("BR", 29),
    ("BY", 28),
    ("CH", 21),
    ("CR", 22),
    ("CY", 28),
    ("CZ", 24),
    ("DE", 22),
    ("DK", 18),
    ("DO", 28),
    ("EE", 20),
    ("EG", 29),
    ("ES", 24),
    ("FI", 18),
    ("FO", 18),
    ("FR", 27),
    ("GB", 22),
    ("GE", 22),
    ("GI", 23),
    ("GL", 18),
    ("GR", 27),
    ("GT", 28),
    ("HR", 21),
    ("HU", 28),
    ("IE", 22),
    ("IL", 23),
    ("IQ", 23),
    ("IS", 26),
    ("IT", 27),
    ("JO", 30),
    ("KW", 30),
    ("KZ", 20),
    ("LB", 28),
    ("LC", 32),
    ("LI", 21),
    ("LT", 20),
    ("LU", 20),
    ("LV", 21),
    ("MC", 27),
    ("MD", 24),
    ("ME", 22),
    ("MK", 19),
    ("MR", 27),
    ("MT", 31),
    ("MU", 30),
    ("NL", 18),
    ("NO", 15),
    ("PK", 24),
    ("PL", 28),
    ("PS", 29),
    ("PT", 25),
    ("QA", 29),
    ("RO", 24),
    ("RS", 22),
    ("SA", 24),
    ("SC", 31),
    ("SE", 24),
    ("SI", 19),
    ("SK", 24),
    ("SM", 27),
    ("ST", 25),
    ("SV", 28),
    ("TL", 23),
    ("TN", 24),
    ("TR", 26),
    ("UA", 29),
    ("VA", 22),
    ("VG", 24),
    ("XK", 20),
];

/// The IBAN length of a country, or `None` where the country has no IBAN.
pub(crate) fn iban_length(country: &[u8]) -> Option<usize> {
    IBAN_LENGTHS.iter().find(|(code, _)| code.as_bytes() == country).map(|&(_, len)| len)
}

/// ISO 13616: move the first four characters to the end, letters to 10..35, mod 97 must be 1.
/// `compact` is the IBAN without spaces, upper case.
pub(crate) fn iban_ok(compact: &[u8]) -> bool {
    if compact.len() < 5 || iban_length(&compact[..2]) != Some(compact.len()) {
        return false;
    }
    if !compact[2].is_ascii_digit() || !compact[3].is_ascii_digit() {
        return false;
    }
    let mut remainder = 0u32;
    for &byte in compact[4..].iter().chain(&compact[..4]) {
        let value = match byte {
            b'0'..=b'9' => u32::from(byte - b'0'),
            b'A'..=b'Z' => u32::from(byte - b'A') + 10,
            _ => return false,
        };
        remainder = if value < 10 { (remainder * 10 + value) % 97 } else { (remainder * 100 + value) % 97 };
    }
    remainder == 1
}

/// Province codes, the first two digits of a resident ID number.
const CN_PROVINCES: &[u8] = &[
    11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46, 50, 51, 52, 53, 54,
    61, 62, 63, 64, 65, 71, 81, 82, 83, 91,
];

/// A Chinese resident ID number (GB 11643-1999): province, a real birth date and the
/// ISO 7064 MOD 11-2 check character. `id` is 18 ASCII bytes.
pub(crate) fn cn_id_ok(id: &[u8]) -> bool {
    if id.len() != 18 || !id[..17].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let number = |range: std::ops::Range<usize>| -> u32 {
        id[range].iter().fold(0, |acc, &b| acc * 10 + u32::from(b - b'0'))
    };
    let province = number(0..2);
    if !CN_PROVINCES.iter().any(|&code| u32::from(code) == province) {
        return false;
    }
    let (year, month, day) = (number(6..10), number(10..12), number(12..14));
    if !(1900..=2099).contains(&year) || !(1..=12).contains(&month) || day == 0 {
        return false;
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if day > days_in_month {
        return false;
    }
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: [u8; 11] = *b"10X98765432";
    let sum: u32 = id[..17].iter().zip(WEIGHTS).map(|(&b, w)| u32::from(b - b'0') * w).sum();
    CHECK[(sum % 11) as usize] == id[17].to_ascii_uppercase()
}

/// A dotted-quad IPv4 address: four octets ≤ 255, none with a leading zero.
pub(crate) fn ipv4_ok(text: &str) -> bool {
    let mut parts = 0;
    for octet in text.split('.') {
        parts += 1;
        let valid = !octet.is_empty()
            && octet.len() <= 3
            && octet.bytes().all(|b| b.is_ascii_digit())
            && !(octet.len() > 1 && octet.starts_with('0'))
            && octet.parse::<u16>().is_ok_and(|value| value <= 255);
        if !valid {
            return false;
        }
    }
    parts == 4
}

/// The length of the ITU country code at the start of an international number.
fn country_code_len(digits: &[u8]) -> usize {
    match digits[0] {
        b'1' | b'7' => 1,
        _ => {
            let two = (digits[0] - b'0') * 10 + (digits[1] - b'0');
            let two_digit_codes: &[u8] = &[
                20, 27, 30, 31, 32, 33, 34, 36, 39, 40, 41, 43, 44, 45, 46, 47, 48, 49, 51, 52, 53, 54, 55,
                56, 57, 58, 60, 61, 62, 63, 64, 65, 66, 81, 82, 84, 86, 90, 91, 92, 93, 94, 95, 98,
            ];
            if two_digit_codes.contains(&two) { 2 } else { 3 }
        }
    }
}

/// Whether the digits of a `+` number (country code first, no separators) form a plausible
/// E.164 number: 8–15 digits, and the national length of the country where we know it.
pub(crate) fn e164_ok(digits: &[u8]) -> bool {
    if !(8..=15).contains(&digits.len()) || digits[0] == b'0' {
        return false;
    }
    let cc_len = country_code_len(digits);
    let country: u32 = digits[..cc_len].iter().fold(0, |acc, &b| acc * 10 + u32::from(b - b'0'));
    let national = &digits[cc_len..];
    let len = national.len();
    // Italy keeps the leading 0 of landlines; everywhere else it is a trunk prefix not dialled
    // after the country code.
    if national.first() == Some(&b'0') && country != 39 {
        return false;
    }
    match country {
        // North America: NXX-NXX-XXXX.
        1 => len == 10 && national[0] >= b'2' && national[3] >= b'2',
        7 | 91 | 52 => len == 10,
        // China: mobiles 1[3-9] + 9 digits; landlines area code + number, 9-11 digits (Beijing 10).
        86 => match national {
            [b'1', b'3'..=b'9', ..] => len == 11,
            [b'1', b'0', ..] => len == 10,
            [b'1', ..] => false,
            _ => (9..=11).contains(&len),
        },
        44 => (9..=10).contains(&len),
        33 | 34 | 61 | 31 | 41 => len == 9,
        81 => (9..=10).contains(&len),
        82 => (8..=10).contains(&len),
        852 | 853 | 65 => len == 8,
        886 => (8..=9).contains(&len),
        55 => (10..=11).contains(&len),
        _ => len >= 6,
    }
}

/// A Chinese mobile number: 11 digits starting with 1[3-9].
pub(crate) fn cn_mobile_ok(digits: &[u8]) -> bool {
    digits.len() == 11 && digits[0] == b'1' && (b'3'..=b'9').contains(&digits[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn() {
        assert!(luhn_ok(b"4111111111111111"));
        assert!(luhn_ok(b"378282246310005"));
        assert!(!luhn_ok(b"4111111111111112"));
    }

    #[test]
    fn card_prefixes() {
        assert!(card_prefix_ok(b"4111111111111111"));
        assert!(card_prefix_ok(b"378282246310005"));
        assert!(!card_prefix_ok(b"3782822463100050"));
        assert!(card_prefix_ok(b"2223003122003222"));
        assert!(!card_prefix_ok(b"9111111111111111"));
    }

    #[test]
    fn ibans() {
        assert!(iban_ok(b"GB82WEST12345698765432"));
        assert!(iban_ok(b"DE89370400440532013000"));
        assert!(!iban_ok(b"GB83WEST12345698765432"));
        assert!(!iban_ok(b"GB82WEST1234569876543"));
        assert!(!iban_ok(b"ZZ82WEST12345698765432"));
    }

    #[test]
    fn cn_ids() {
        assert!(cn_id_ok(b"11010519491231002X"));
        assert!(cn_id_ok(b"11010519491231002x"));
        assert!(!cn_id_ok(b"110105194912310021"));
        // 29 February of a year that is not a leap year.
        assert!(!cn_id_ok(b"110105190002290011"));
    }

    #[test]
    fn ipv4() {
        assert!(ipv4_ok("192.168.1.1"));
        assert!(ipv4_ok("0.0.0.0"));
        assert!(!ipv4_ok("999.1.1.1"));
        assert!(!ipv4_ok("01.2.3.4"));
        assert!(!ipv4_ok("1.2.3"));
    }

    #[test]
    fn e164() {
        assert!(e164_ok(b"14155550132"));
        assert!(!e164_ok(b"14155550132123"));
        assert!(e164_ok(b"442079460958"));
        assert!(e164_ok(b"8613812345678"));
        assert!(!e164_ok(b"8612812345678"));
        assert!(e164_ok(b"861012345678"));
        assert!(e164_ok(b"4930123456"));
        assert!(!e164_ok(b"1234567"));
    }
}
