//! A compile-time check of `#[earnorm(pattern = "..")]`: the mistakes that
//! make the `regex` crate refuse a pattern, found while the derive expands,
//! so that a bad pattern is a compile error at its literal instead of a
//! validation failure on every `save`.
//!
//! It only reports what is certainly an error (unbalanced groups and
//! classes, a lone `\`, unknown escapes, back-references, look-around,
//! repetition of nothing, counted repetitions whose bounds are reversed or
//! whose nesting is certainly too large to compile); anything it lets
//! through is still checked when the pattern is first used. Its unit tests
//! compare it with the `regex` crate.

/// The largest number of repeated atoms a pattern may certainly not
/// exceed: `a{N}` compiles in the `regex` crate's default size limit for N
/// up to about this (see the tests); a larger count of even the cheapest
/// atom cannot.
const MAX_REPEATED_ATOMS: u64 = 300_000;

/// Why `pattern` cannot compile, or `Ok`.
///
/// The size check counts atoms (each at least one instruction once
/// compiled): a group counts what it holds, a repetition multiplies what it
/// repeats, and the total must stay within [`MAX_REPEATED_ATOMS`].
pub(crate) fn check(pattern: &str) -> Result<(), String> {
    let chars: Vec<char> = pattern.chars().collect();
    // Atoms counted so far: the whole pattern, then one entry per open group.
    let mut sizes: Vec<u64> = vec![0];
    // Whether the last item can be repeated (not the start, `(` or `|`).
    let mut can_repeat = false;
    // Atoms in the last item (what a repetition multiplies).
    let mut last = 0u64;
    let mut i = 0;
    let add = |sizes: &mut Vec<u64>, n: u64| {
        if let Some(top) = sizes.last_mut() {
            *top = top.saturating_add(n);
        }
    };
    while i < chars.len() {
        let c = chars[i];
        let next = match c {
            '\\' => Some(escape(&chars, i)?),
            '[' => Some(class(&chars, i)?),
            _ => None,
        };
        if let Some(next) = next {
            add(&mut sizes, 1);
            last = 1;
            can_repeat = true;
            i = next;
            continue;
        }
        match c {
            '(' => {
                can_repeat = false;
                match group_start(&chars, i)? {
                    (true, next) => {
                        sizes.push(0);
                        i = next;
                    }
                    (false, next) => i = next,
                }
                continue;
            }
            ')' => {
                if sizes.len() < 2 {
                    return Err(format!("a `)` at character {} closes no group", i + 1));
                }
                last = sizes.pop().unwrap_or(0).max(1);
                add(&mut sizes, last);
                can_repeat = true;
            }
            '|' => can_repeat = false,
            '*' | '+' | '?' => {
                let after_repetition = i > 0 && matches!(chars[i - 1], '*' | '+' | '?' | '}');
                if !can_repeat && !after_repetition {
                    return Err(format!("`{c}` at character {} repeats nothing", i + 1));
                }
            }
            '{' => {
                if let Some((low, high, end)) = counted(&chars, i) {
                    if !can_repeat {
                        return Err(format!("`{{` at character {} repeats nothing", i + 1));
                    }
                    if high.is_some_and(|high| high < low) {
                        return Err(format!("the repetition at character {} has its bounds reversed", i + 1));
                    }
                    let count = high.unwrap_or(low).max(1);
                    add(&mut sizes, last.saturating_mul(count - 1));
                    last = last.saturating_mul(count);
                    if sizes.iter().fold(0u64, |a, b| a.saturating_add(*b)) > MAX_REPEATED_ATOMS {
                        return Err(format!(
                            "the repetition at character {} makes the pattern too large to compile",
                            i + 1
                        ));
                    }
                    i = end;
                    continue;
                }
                add(&mut sizes, 1);
                last = 1;
                can_repeat = true;
            }
            _ => {
                add(&mut sizes, 1);
                last = 1;
                can_repeat = true;
            }
        }
        i += 1;
    }
    if sizes.len() > 1 {
        return Err("a `(` is never closed".into());
    }
    Ok(())
}

/// The group syntax at `chars[at]` (a `(`): whether it opens a group (`(?i)`
/// only sets flags), and where its content starts. Refuses look-around.
fn group_start(chars: &[char], at: usize) -> Result<(bool, usize), String> {
    if chars.get(at + 1) != Some(&'?') {
        return Ok((true, at + 1));
    }
    let rest: String = chars[at + 2..].iter().take(2).collect();
    if rest.starts_with('=') || rest.starts_with('!') || rest.starts_with("<=") || rest.starts_with("<!") {
        return Err("look-around (`(?=`, `(?!`, `(?<=`, `(?<!`) is not supported".into());
    }
    if rest.starts_with('P') || rest.starts_with('<') {
        return match chars[at..].iter().position(|&c| c == '>') {
            Some(close) => Ok((true, at + close + 1)),
            None => Err(format!("the group name at character {} is never closed", at + 1)),
        };
    }
    match chars[at + 2..].iter().position(|&c| c == ':' || c == ')') {
        Some(end) if chars[at + 2 + end] == ':' => Ok((true, at + 2 + end + 1)),
        Some(end) => Ok((false, at + 2 + end + 1)),
        None => Err(format!("the group at character {} is never closed", at + 1)),
    }
}

/// Checks the escape starting at `chars[at]` (a `\`); returns where the
/// next item starts.
fn escape(chars: &[char], at: usize) -> Result<usize, String> {
    let Some(&next) = chars.get(at + 1) else {
        return Err("the pattern ends with a lone `\\`".into());
    };
    match next {
        '1'..='9' => Err(format!("`\\{next}`: back-references are not supported")),
        'p' | 'P' if chars.get(at + 2) == Some(&'{') => match chars[at + 3..].iter().position(|&c| c == '}') {
            Some(close) => Ok(at + 3 + close + 1),
            None => Err(format!("`\\{next}{{` is never closed")),
        },
        'x' | 'u' | 'U' if chars.get(at + 2) == Some(&'{') => match chars[at + 3..].iter().position(|&c| c == '}') {
            Some(close) => Ok(at + 3 + close + 1),
            None => Err(format!("`\\{next}{{` is never closed")),
        },
        'b' if chars.get(at + 2) == Some(&'{') => match chars[at + 3..].iter().position(|&c| c == '}') {
            Some(close) => Ok(at + 3 + close + 1),
            None => Err("`\\b{` is never closed".into()),
        },
        c if c.is_ascii_alphabetic() && !"dDwWsSbBAzpPxuUntrfva".contains(c) => {
            Err(format!("`\\{c}` is not an escape the regex crate knows"))
        }
        _ => Ok(at + 2),
    }
}

/// Skips the class starting at `chars[at]` (a `[`), nested classes
/// included; returns where the next item starts.
fn class(chars: &[char], at: usize) -> Result<usize, String> {
    let mut depth = 0usize;
    let mut i = at;
    while i < chars.len() {
        match chars[i] {
            '\\' => {
                i = escape(chars, i)?;
                continue;
            }
            '[' => {
                // `[:alpha:]` inside a class is one item.
                if depth > 0 && chars.get(i + 1) == Some(&':') {
                    if let Some(end) = chars[i + 2..].windows(2).position(|w| w == [':', ']']) {
                        i += 2 + end + 2;
                        continue;
                    }
                }
                depth += 1;
                i += 1;
                if chars.get(i) == Some(&'^') {
                    i += 1;
                }
                // A `]` first in a class is a literal.
                if chars.get(i) == Some(&']') {
                    i += 1;
                }
                continue;
            }
            ']' => {
                depth -= 1;
                if depth == 0 {
                    return Ok(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    Err(format!(
        "the character class opened at character {} is never closed",
        at + 1
    ))
}

/// A counted repetition `{n}`, `{n,}` or `{n,m}` at `chars[at]`: its bounds
/// and where the next item starts; `None` when `{` does not start one.
fn counted(chars: &[char], at: usize) -> Option<(u64, Option<u64>, usize)> {
    let close = at + chars[at..].iter().position(|&c| c == '}')?;
    let inside: String = chars[at + 1..close].iter().collect();
    let inside = inside.trim();
    let number = |s: &str| s.trim().parse::<u64>().ok();
    let (low, high) = match inside.split_once(',') {
        Some((low, high)) if high.trim().is_empty() => (number(low)?, None),
        Some((low, high)) => (number(low)?, Some(number(high)?)),
        None => {
            let n = number(inside)?;
            (n, Some(n))
        }
    };
    Some((low, high, close + 1))
}

#[cfg(test)]
mod tests {
    use super::check;

    const VALID: &[&str] = &[
        "[a-z]{2}-[0-9]+",
        r"^\d{3}-\d{4}$",
        r"(?i)hello|world",
        r"(?P<year>\d{4})-(?<month>\d{2})",
        r"[[:alpha:]]+",
        r"[]a]",
        r"[^]a]",
        r"\p{Greek}+\P{L}",
        r"\pL\x41\x{263A}\u{1F600}",
        r"a*?b+?c??",
        r"(?:ab){2,5}",
        r"[a-z&&[^aeiou]]",
        r"\.\*\+\?\(\)\[\]\{\}\|\^\$\\",
        r"\bword\B\A\z",
        r"a{1000}",
        r"x{0}",
        r"[\d\s\w-]",
        r"a{,3}",
        r"{",
        r"a{",
    ];

    const INVALID: &[&str] = &[
        r"(abc",
        r"abc)",
        r"[abc",
        r"abc\",
        r"*abc",
        r"a|*b",
        r"(+a)",
        r"a{5,2}",
        r"\q",
        r"(a)\1",
        r"(?=a)b",
        r"(?<!a)b",
        r"(?:a{1000}){1000}",
        r"a{1000000}",
    ];

    #[test]
    fn valid_patterns_pass_and_invalid_ones_are_caught() {
        for pattern in VALID {
            let ours = check(pattern);
            let theirs = regex::Regex::new(pattern);
            // Never refuse what the regex crate accepts.
            if theirs.is_ok() {
                assert!(ours.is_ok(), "{pattern:?} compiles but was refused: {ours:?}");
            }
        }
        for pattern in INVALID {
            assert!(
                regex::Regex::new(pattern).is_err(),
                "{pattern:?} is meant to be invalid"
            );
            assert!(check(pattern).is_err(), "{pattern:?} was not caught");
        }
    }

    #[test]
    fn the_size_bound_is_below_what_the_regex_crate_refuses() {
        let largest_accepted = format!("a{{{}}}", super::MAX_REPEATED_ATOMS);
        assert!(check(&largest_accepted).is_ok());
        let past = format!("a{{{}}}", super::MAX_REPEATED_ATOMS * 4);
        assert!(regex::Regex::new(&past).is_err(), "the bound is conservative");
    }
}
