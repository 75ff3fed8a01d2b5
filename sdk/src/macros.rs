//! The two macros a task author uses: `task!` defines tasks, `export_tasks!` exports them.

/// Defines one or more tasks.
///
/// Each function keeps its name and body; beside it the macro adds a module of the same name
/// with the task's `NAME`, its `info()` defaults and the `call` glue that decodes Celery
/// args/kwargs into the parameters. Settings in `#[task(...)]` are the fields of
/// [`TaskInfo`](crate::TaskInfo): `queue`, `soft_time_limit_ms`, `hard_time_limit_ms`,
/// `memory_limit_bytes`, `fuel`, `max_retries`, `retry_backoff_ms`, `retry_backoff_max_ms`,
/// `rate_limit`. The doc comment becomes the task's description.
#[macro_export]
macro_rules! task {
    ($(
        $(#[doc = $doc:literal])*
        #[task(name = $name:literal $(, $key:ident = $value:expr)* $(,)?)]
        $vis:vis fn $fn_name:ident(
            $cx:ident : $cx_ty:ty $(, $arg:ident : $ty:ty)* $(,)?
        ) -> $ret:ty $body:block
    )+) => {$(
        $(#[doc = $doc])*
        $vis fn $fn_name($cx: $cx_ty $(, $arg: $ty)*) -> $ret $body

        #[doc = concat!("Registration of the `", $name, "` task.")]
        #[allow(dead_code)]
        $vis mod $fn_name {
            #[allow(unused_imports)]
            use super::*;

            /// The name producers send.
            pub const NAME: &str = $name;

            /// The task's declared defaults.
            pub fn info() -> $crate::TaskInfo {
                #[allow(unused_mut)]
                let mut info = $crate::base_info($name, concat!($($doc, "\n"),*));
                $( info.$key = $crate::IntoSetting::into_setting($value); )*
                info
            }

            /// Decodes the arguments, runs the function and encodes its result.
            pub fn call(
                call: $crate::bindings::Call,
            ) -> ::core::result::Result<::std::string::String, $crate::bindings::WitTaskError> {
                #[allow(unused_mut)]
                let (cx, mut arguments) = $crate::Arguments::parse(&call)?;
                let result = (|| {
                    $( let $arg: $ty = arguments.take(stringify!($arg))?; )*
                    arguments.finish()?;
                    super::$fn_name(&cx $(, $arg)*)
                })();
                $crate::finish_run(result)
            }
        }
    )+};
}

/// Exports the listed tasks as this component's implementation of the celeriac world.
/// Use it once per component crate.
#[macro_export]
macro_rules! export_tasks {
    ($($task:ident),+ $(,)?) => {
        struct CeleriacTasks;

        impl $crate::bindings::Guest for CeleriacTasks {
            fn describe() -> ::std::vec::Vec<$crate::TaskInfo> {
                ::std::vec![$($task::info()),+]
            }

            fn run(
                name: ::std::string::String,
                call: $crate::bindings::Call,
            ) -> ::core::result::Result<::std::string::String, $crate::bindings::WitTaskError> {
                $( if name == $task::NAME { return $task::call(call); } )+
                ::core::result::Result::Err(
                    $crate::TaskError::fail("NotRegistered", ::std::format!("task {name} is not served by this component")).into()
                )
            }
        }

        $crate::bindings::__export_celeriac_task!(CeleriacTasks with_types_in $crate::bindings);
    };
}
