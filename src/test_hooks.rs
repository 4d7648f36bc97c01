//! Test-only points inside functions whose correctness depends on what may
//! happen between two of their steps: a unit test sets a hook at a point to
//! make a concurrent event land exactly there. Compiled only into the
//! crate's own unit tests; hooks are per thread, so tests do not share them.

use std::cell::RefCell;

type Hook = Box<dyn FnMut()>;

thread_local! {
    static HOOKS: RefCell<Vec<(&'static str, Hook)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `hook` the next time this thread reaches `point`, once.
pub(crate) fn once(point: &'static str, hook: impl FnMut() + 'static) {
    HOOKS.with(|hooks| hooks.borrow_mut().push((point, Box::new(hook))));
}

/// Called at `point`: runs the hook set for it, if any.
pub(crate) fn reached(point: &'static str) {
    let hook = HOOKS.with(|hooks| {
        let mut hooks = hooks.borrow_mut();
        let at = hooks.iter().position(|(p, _)| *p == point)?;
        Some(hooks.remove(at).1)
    });
    if let Some(mut hook) = hook {
        hook();
    }
}
