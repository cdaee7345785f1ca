//! The numbers inside [`crate::messages::AclEntry`]: resource types, pattern types,
//! operations and permissions, with the names the CLI and the SDKs use for them.

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $value:literal, $text:literal; )* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $value, )*
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$( $name::$variant, )*];

            pub fn from_u8(value: u8) -> Option<$name> {
                match value {
                    $( $value => Some($name::$variant), )*
                    _ => None,
                }
            }

            pub fn as_u8(self) -> u8 {
                self as u8
            }

            /// The name used on command lines and in listings.
            pub fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<$name, String> {
                let wanted = s.to_ascii_lowercase().replace('_', "-");
                $name::ALL
                    .iter()
                    .find(|v| v.name() == wanted)
                    .copied()
                    .ok_or_else(|| {
                        let names: Vec<&str> = $name::ALL.iter().map(|v| v.name()).collect();
                        format!("{s:?} is not one of {}", names.join(", "))
                    })
            }
        }
    };
}

wire_enum! {
    /// What an ACL protects.
    ResourceType {
        Topic = 0, "topic";
        /// A consumer group.
        Group = 1, "group";
        /// A Wasm filter module.
        Filter = 2, "filter";
        Transform = 3, "transform";
        /// The broker (cluster) itself: security administration, creating any topic.
        Cluster = 4, "cluster";
    }
}

wire_enum! {
    /// How an ACL's resource name matches.
    PatternType {
        /// The name exactly.
        Literal = 0, "literal";
        /// Every name starting with it.
        Prefix = 1, "prefix";
    }
}

wire_enum! {
    /// What a principal does to a resource. Read and write imply describe.
    Operation {
        Read = 0, "read";
        Write = 1, "write";
        Create = 2, "create";
        Delete = 3, "delete";
        Describe = 4, "describe";
        Alter = 5, "alter";
        DeployFilter = 6, "deploy-filter";
        /// Every operation.
        All = 7, "all";
    }
}

wire_enum! {
    /// Whether an ACL allows or denies. A matching deny wins over any allow.
    Permission {
        Allow = 0, "allow";
        Deny = 1, "deny";
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_round_trip() {
        for op in Operation::ALL {
            assert_eq!(Operation::from_u8(op.as_u8()), Some(*op));
            assert_eq!(op.name().parse::<Operation>(), Ok(*op));
        }
        for r in ResourceType::ALL {
            assert_eq!(ResourceType::from_u8(r.as_u8()), Some(*r));
            assert_eq!(r.name().parse::<ResourceType>(), Ok(*r));
        }
        assert_eq!(
            "DEPLOY_FILTER".parse::<Operation>(),
            Ok(Operation::DeployFilter)
        );
        assert!("fly".parse::<Operation>().is_err());
        assert_eq!(Operation::from_u8(8), None);
        assert_eq!(Permission::from_u8(2), None);
        assert_eq!(PatternType::from_u8(2), None);
    }
}
