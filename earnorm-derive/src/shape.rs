//! Type shapes: what this module alone owns is reading a type's shape as
//! written (its last path segment and first type argument), for the checks
//! and the code both macros generate from it. A macro sees tokens, not
//! types: an alias or a re-export of `Option` is not recognized as one.

use syn::{GenericArgument, PathArguments, Type};

/// The last path segment's name and its first type argument: `("Option",
/// Some(String))` for `std::option::Option<String>`; `None` for a type
/// that is not a path.
pub(crate) fn last_segment(ty: &Type) -> Option<(String, Option<&Type>)> {
    let Type::Path(path) = ty else { return None };
    let segment = path.path.segments.last()?;
    let inner = match &segment.arguments {
        PathArguments::AngleBracketed(args) => args.args.iter().find_map(|a| match a {
            GenericArgument::Type(t) => Some(t),
            _ => None,
        }),
        _ => None,
    };
    Some((segment.ident.to_string(), inner))
}
