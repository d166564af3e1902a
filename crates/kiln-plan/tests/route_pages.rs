//! A route's error pages are part of the generation by content: a page
//! changed under the same path reconfigures the route and nothing else.

use kiln_plan::testing::{generation, route, service, spec, steady};
use kiln_plan::{Digest, Step, plan, simulate};

#[test]
fn a_changed_page_reconfigures_its_route_only() {
    let mut web = route("web", "127.0.0.1:8080");
    web.error_pages.insert(503, "pages/503.html".to_owned());
    let old = generation(spec([("web", service("app:1"))], [("web", web)]));
    let world = steady(&old);
    assert!(plan(&old, &world).steps.is_empty());

    let mut new = old.clone();
    new.resolved
        .files
        .insert("pages/503.html".to_owned(), Digest::of(b"<h1>later</h1>"));
    assert_ne!(old.content_hash(), new.content_hash());
    let p = plan(&new, &world);
    assert!(
        matches!(&p.steps[..], [Step::ConfigureRoute { name, .. }] if name == "web"),
        "{:#?}",
        p.steps
    );
    let after = simulate::apply(&new, &world, &p);
    assert!(plan(&new, &after).steps.is_empty());
    // Back: the old content is what the route must serve again.
    assert_eq!(plan(&old, &after).steps.len(), 1);
}

#[test]
fn a_page_the_resolution_lacks_is_an_error() {
    let mut web = route("web", "127.0.0.1:8080");
    web.error_pages.insert(502, "pages/502.html".to_owned());
    let spec = spec([("web", service("app:1"))], [("web", web)]);
    let mut resolved = kiln_plan::testing::resolve(&spec);
    resolved.files.remove("pages/502.html");
    let errors = kiln_plan::Generation::new(spec, resolved).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].to_string().contains("pages/502.html"),
        "{}",
        errors[0]
    );
}
