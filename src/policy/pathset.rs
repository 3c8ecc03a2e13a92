//! A set of field paths as a bitset over [`FieldPath::ALL`]: grants are checked with a few bit
//! operations on every call.

use std::fmt;

use super::FieldPath;

const _: () = assert!(FieldPath::ALL.len() <= 32, "PathSet holds at most 32 paths");

/// A set of leaves; bit `i` stands for `FieldPath::ALL[i]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct PathSet(u32);

impl PathSet {
    pub const EMPTY: PathSet = PathSet(0);

    /// Every leaf of the vocabulary.
    pub fn all() -> Self {
        PathSet(u32::MAX >> (32 - FieldPath::ALL.len()))
    }

    fn bit(p: FieldPath) -> u32 {
        // Variants are declared in the order of `ALL`, so the discriminant is the index.
        1 << (p as u32)
    }

    pub fn contains(self, p: FieldPath) -> bool {
        self.0 & Self::bit(p) != 0
    }

    pub fn insert(&mut self, p: FieldPath) {
        self.0 |= Self::bit(p);
    }

    pub fn union(self, o: PathSet) -> Self {
        PathSet(self.0 | o.0)
    }

    /// The paths of `self` that are not in `o`.
    pub fn difference(self, o: PathSet) -> Self {
        PathSet(self.0 & !o.0)
    }

    pub fn intersection(self, o: PathSet) -> Self {
        PathSet(self.0 & o.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every path of `self` is in `o`.
    pub fn is_subset(self, o: PathSet) -> bool {
        self.difference(o).is_empty()
    }

    /// The paths, in the order of [`FieldPath::ALL`].
    pub fn iter(self) -> impl Iterator<Item = FieldPath> {
        FieldPath::ALL
            .iter()
            .copied()
            .filter(move |p| self.contains(*p))
    }

    pub fn from_paths(paths: impl IntoIterator<Item = FieldPath>) -> Self {
        paths.into_iter().collect()
    }

    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }
}

impl FromIterator<FieldPath> for PathSet {
    fn from_iter<I: IntoIterator<Item = FieldPath>>(iter: I) -> Self {
        let mut s = PathSet::EMPTY;
        for p in iter {
            s.insert(p);
        }
        s
    }
}

/// The paths, comma-separated.
impl fmt::Display for PathSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(p.as_str())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bit_of_a_path_is_its_index_in_all() {
        for (i, p) in FieldPath::ALL.iter().enumerate() {
            assert_eq!(PathSet::bit(*p), 1 << i, "{p}");
        }
        assert_eq!(PathSet::all().len(), FieldPath::ALL.len());
        assert_eq!(PathSet::all().iter().collect::<Vec<_>>(), FieldPath::ALL);
    }

    #[test]
    fn set_operations() {
        let a = PathSet::from_paths([FieldPath::NameGiven, FieldPath::ContactEmail]);
        let b = PathSet::from_paths([FieldPath::ContactEmail, FieldPath::ActivityLog]);
        assert_eq!(a.union(b).len(), 3);
        assert_eq!(
            a.intersection(b).iter().collect::<Vec<_>>(),
            [FieldPath::ContactEmail]
        );
        assert_eq!(
            a.difference(b).iter().collect::<Vec<_>>(),
            [FieldPath::NameGiven]
        );
        assert!(a.contains(FieldPath::NameGiven) && !a.contains(FieldPath::ActivityLog));
        assert!(PathSet::EMPTY.is_empty() && PathSet::default().is_empty());
        assert!(a.intersection(b).is_subset(a) && !a.is_subset(b));
        let mut c = PathSet::EMPTY;
        c.insert(FieldPath::ActivityLog);
        c.insert(FieldPath::ActivityLog);
        assert_eq!(c.len(), 1);
        assert_eq!(a.to_string(), "name.given, contact.email");
        assert_eq!(PathSet::all().difference(PathSet::all()), PathSet::EMPTY);
    }
}
