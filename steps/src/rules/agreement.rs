//! Both-order agreement, the one rule behind pairwise evaluation and meta-judging: a judge shown
//! two candidates in both orders prefers one only when both orders name it. Position bias (a
//! small judge answers `A` most of the time whatever it is shown) then reads as disagreement,
//! never as a preference.

/// What one order's verdict says once its order is undone.
#[derive(Clone, Debug, PartialEq)]
pub enum Said<T> {
    /// It prefers this candidate.
    Prefers(T),
    /// Neither (a logprob verdict with both letters exactly equally likely).
    Tie,
    /// The verdict cannot be read.
    Unreadable,
}

/// The orders' verdicts together.
#[derive(Clone, Debug, PartialEq)]
pub enum Agreement<T> {
    /// Every order prefers this candidate.
    Both(T),
    /// Every verdict was read, and they do not all prefer the same candidate (or one is a tie).
    Disagree,
    /// The verdict at this position cannot be read (the first such), so nothing is decided.
    Unreadable(usize),
}

/// Combine the verdicts of every order (in the order they were asked).
pub fn agree<T: PartialEq + Clone>(said: &[Said<T>]) -> Agreement<T> {
    if let Some(i) = said.iter().position(|s| *s == Said::Unreadable) {
        return Agreement::Unreadable(i);
    }
    match said.first() {
        Some(Said::Prefers(x)) if said.iter().all(|s| matches!(s, Said::Prefers(y) if y == x)) => {
            Agreement::Both(x.clone())
        }
        _ => Agreement::Disagree,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Said::*;

    #[test]
    fn a_preference_needs_every_order() {
        assert_eq!(agree(&[Prefers(1), Prefers(1)]), Agreement::Both(1));
        assert_eq!(agree(&[Prefers(1), Prefers(2)]), Agreement::Disagree);
        assert_eq!(agree(&[Prefers(1), Tie]), Agreement::Disagree);
        assert_eq!(agree(&[Tie, Tie]), Agreement::<u8>::Disagree);
        assert_eq!(agree(&[Prefers(1), Unreadable]), Agreement::Unreadable(1));
        assert_eq!(
            agree(&[Unreadable, Unreadable]),
            Agreement::<u8>::Unreadable(0)
        );
        assert_eq!(agree::<u8>(&[]), Agreement::Disagree);
    }
}
