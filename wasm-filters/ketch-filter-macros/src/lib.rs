//! The attributes of `ketch-filter`. Each keeps the user's function as written and adds the
//! module's ABI exports (see `wasm-filters/ABI.md`), which call into `ketch_filter::__private`.
//! Written without `syn`: all they need is the function's name.

use proc_macro::{Delimiter, TokenStream, TokenTree};

/// The identifier after the `fn` keyword.
fn function_name(item: &TokenStream) -> Result<String, TokenStream> {
    let mut tokens = item.clone().into_iter();
    while let Some(token) = tokens.next() {
        if let TokenTree::Ident(ident) = &token
            && ident.to_string() == "fn"
        {
            if let Some(TokenTree::Ident(name)) = tokens.next() {
                return Ok(name.to_string());
            }
        }
        // A brace group is the body: stop before looking inside it.
        if let TokenTree::Group(group) = &token
            && group.delimiter() == Delimiter::Brace
        {
            break;
        }
    }
    Err(
        "compile_error!(\"a ketch_filter attribute goes on a function\");"
            .parse()
            .expect("valid tokens"),
    )
}

fn with_exports(item: TokenStream, runner: &str) -> TokenStream {
    let name = match function_name(&item) {
        Ok(name) => name,
        Err(error) => return error,
    };
    let exports = format!(
        r#"
        #[allow(unused_imports)]
        use ::ketch_filter::__private::fallback::*;

        #[doc(hidden)]
        #[unsafe(no_mangle)]
        pub extern "C" fn ketch_abi_version() -> i32 {{ ::ketch_filter::__private::ABI_VERSION }}

        #[doc(hidden)]
        #[unsafe(no_mangle)]
        pub extern "C" fn ketch_alloc(len: i32) -> i32 {{ ::ketch_filter::__private::alloc(len) }}

        #[doc(hidden)]
        #[unsafe(no_mangle)]
        pub extern "C" fn ketch_init(ptr: i32, len: i32) -> i64 {{
            ::ketch_filter::__private::init(ptr, len, __ketch_user_init)
        }}

        #[doc(hidden)]
        #[unsafe(no_mangle)]
        pub extern "C" fn ketch_process(ptr: i32, len: i32) -> i64 {{
            ::ketch_filter::__private::{runner}(ptr, len, {name})
        }}
        "#
    );
    let mut out = item;
    out.extend(exports.parse::<TokenStream>().expect("valid export tokens"));
    out
}

/// `#[ketch_filter::filter] fn keep(record: &Record) -> bool` (or `-> Result<bool, E>` where
/// an `Err` is a record error carrying `E`'s `Display` text to the host).
#[proc_macro_attribute]
pub fn filter(_attr: TokenStream, item: TokenStream) -> TokenStream {
    with_exports(item, "run_filter")
}

/// `#[ketch_filter::map] fn f(record: &Record) -> RecordOut` (or `Result<RecordOut, E>`).
#[proc_macro_attribute]
pub fn map(_attr: TokenStream, item: TokenStream) -> TokenStream {
    with_exports(item, "run_actions")
}

/// `#[ketch_filter::filter_map] fn f(record: &Record) -> Option<RecordOut>` (or
/// `Result<Option<RecordOut>, E>`).
#[proc_macro_attribute]
pub fn filter_map(_attr: TokenStream, item: TokenStream) -> TokenStream {
    with_exports(item, "run_actions")
}

/// `#[ketch_filter::flat_map] fn f(record: &Record) -> Vec<RecordOut>` (or
/// `Result<Vec<RecordOut>, E>`).
#[proc_macro_attribute]
pub fn flat_map(_attr: TokenStream, item: TokenStream) -> TokenStream {
    with_exports(item, "run_actions")
}

/// `#[ketch_filter::init] fn init(params: &str) -> Result<(), String>`: runs once per
/// instance before any batch; an `Err` refuses the attachment with its message. Put it in the
/// same module as the filter's attribute (normally the crate root).
#[proc_macro_attribute]
pub fn init(_attr: TokenStream, item: TokenStream) -> TokenStream {
    let name = match function_name(&item) {
        Ok(name) => name,
        Err(error) => return error,
    };
    // An explicit item shadows the glob-imported default that the filter's attribute brings.
    let hook = format!(
        r#"
        #[doc(hidden)]
        fn __ketch_user_init(params: &str) -> ::core::result::Result<(), ::std::string::String> {{
            ::ketch_filter::__private::IntoInitResult::into_init_result({name}(params))
        }}
        "#
    );
    let mut out = item;
    out.extend(hook.parse::<TokenStream>().expect("valid init tokens"));
    out
}
