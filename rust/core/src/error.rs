//! The one error type of the core. Each variant knows which family of Python exception it
//! becomes ([`ErrorKind`]); the bindings hold the only mapping to Python classes.

use std::fmt;

/// Which standard exception family an error belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A value that is wrong: a shape, a size, a pad value, an argument (`ValueError`).
    Value,
    /// A type that is wrong: a dtype, an object that exposes no memory (`TypeError`).
    Type,
    /// Memory could not be had (`MemoryError`).
    Memory,
}

/// Describes one input array in an error message: its shape and dtype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub shape: Vec<usize>,
    pub dtype: String,
}

impl fmt::Display for Described {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shape {} and dtype {}", ShapeDisplay(&self.shape), self.dtype)
    }
}

/// Formats a shape as Python does: `()`, `(3,)`, `(2, 3)`.
#[derive(Debug)]
pub struct ShapeDisplay<'a>(pub &'a [usize]);

impl fmt::Display for ShapeDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            [] => f.write_str("()"),
            [one] => write!(f, "({one},)"),
            dims => {
                f.write_str("(")?;
                for (i, d) in dims.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{d}")?;
                }
                f.write_str(")")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CoreError {
    #[error("need at least one array to stack")]
    Empty,

    #[error(
        "element {index} has {found}, expected shape {} (the shape of element 0); \
         pass pad= to stack arrays of different shapes",
        ShapeDisplay(expected)
    )]
    ShapeMismatch { index: usize, found: Described, expected: Vec<usize> },

    #[error("element {index} has {found}, expected {expected_ndim} dimensions (those of element 0)")]
    RankMismatch { index: usize, found: Described, expected_ndim: usize },

    #[error("element {index} has {found}, expected dtype {expected} (the dtype of element 0)")]
    DtypeMismatch { index: usize, found: Described, expected: String },

    #[error("element {index} has {found}: {reason}")]
    UnsupportedDtype { index: usize, found: Described, reason: String },

    #[error("element {index} has {found}, whose strides {strides:?} reach outside its {len}-byte buffer")]
    OutOfBounds { index: usize, found: Described, strides: Vec<isize>, len: usize },

    #[error("pad={value} cannot be held by dtype {dtype}: {reason}")]
    PadValue { value: String, dtype: String, reason: String },

    #[error("out= {what}: got {found}, expected {expected}")]
    Out { what: &'static str, found: String, expected: String },

    #[error("out= overlaps the memory of element {index}; stack cannot write over its own input")]
    OutOverlaps { index: usize },

    #[error("a batch of {elements} elements of {element_bytes} bytes each does not fit in memory")]
    TooLarge { elements: usize, element_bytes: usize },

    #[error("could not allocate {bytes} bytes for the batch")]
    Alloc { bytes: usize },

    #[error("{0}")]
    InvalidArgument(String),

    #[error("need at least one column to interleave")]
    NoColumns,

    #[error("column {index} has {len} rows, expected {expected} (the length of column 0)")]
    ColumnLength { index: usize, len: usize, expected: usize },

    #[error("column {index} has dtype {dtype}, which cannot be a feature; supported: {supported}")]
    ColumnDtype { index: usize, dtype: String, supported: &'static str },

    #[error("dtype={dtype} cannot be the output's dtype: {reason}")]
    OutputDtype { dtype: String, reason: String },

    #[error("out= overlaps the memory of column {index}; interleave cannot write over its own input")]
    OutOverlapsColumn { index: usize },

    #[error("a model loader acquired the key it is loading from the same cache; it would wait for itself")]
    ReentrantLoad,
}

impl CoreError {
    /// The Python exception family this error is raised as.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::DtypeMismatch { .. }
            | Self::UnsupportedDtype { .. }
            | Self::ColumnDtype { .. }
            | Self::OutputDtype { .. } => ErrorKind::Type,
            Self::TooLarge { .. } | Self::Alloc { .. } => ErrorKind::Memory,
            Self::Empty
            | Self::ShapeMismatch { .. }
            | Self::RankMismatch { .. }
            | Self::OutOfBounds { .. }
            | Self::PadValue { .. }
            | Self::Out { .. }
            | Self::OutOverlaps { .. }
            | Self::InvalidArgument(_)
            | Self::ReentrantLoad
            | Self::NoColumns
            | Self::ColumnLength { .. }
            | Self::OutOverlapsColumn { .. } => ErrorKind::Value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_print_like_python_tuples() {
        assert_eq!(ShapeDisplay(&[]).to_string(), "()");
        assert_eq!(ShapeDisplay(&[3]).to_string(), "(3,)");
        assert_eq!(ShapeDisplay(&[2, 3]).to_string(), "(2, 3)");
    }

    #[test]
    fn messages_name_element_shape_dtype_and_expectation() {
        let err = CoreError::ShapeMismatch {
            index: 7,
            found: Described { shape: vec![4, 5], dtype: "float32".into() },
            expected: vec![4, 4],
        };
        let msg = err.to_string();
        assert!(msg.contains("element 7"), "{msg}");
        assert!(msg.contains("shape (4, 5) and dtype float32"), "{msg}");
        assert!(msg.contains("expected shape (4, 4)"), "{msg}");
        assert_eq!(err.kind(), ErrorKind::Value);
    }

    #[test]
    fn each_error_maps_to_one_family() {
        let d = Described { shape: vec![1], dtype: "int8".into() };
        assert_eq!(
            CoreError::DtypeMismatch { index: 1, found: d.clone(), expected: "f4".into() }.kind(),
            ErrorKind::Type
        );
        assert_eq!(CoreError::Alloc { bytes: 1 }.kind(), ErrorKind::Memory);
        assert_eq!(CoreError::Empty.kind(), ErrorKind::Value);
        assert_eq!(CoreError::OutOverlaps { index: 0 }.kind(), ErrorKind::Value);
        assert_eq!(CoreError::ColumnLength { index: 1, len: 2, expected: 3 }.kind(), ErrorKind::Value);
        assert_eq!(CoreError::NoColumns.kind(), ErrorKind::Value);
        assert_eq!(CoreError::OutOverlapsColumn { index: 0 }.kind(), ErrorKind::Value);
        assert_eq!(CoreError::ColumnDtype { index: 0, dtype: "c8".into(), supported: "" }.kind(), ErrorKind::Type);
        assert_eq!(CoreError::OutputDtype { dtype: "c8".into(), reason: String::new() }.kind(), ErrorKind::Type);
    }
}
