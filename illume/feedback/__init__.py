"""feedback: the feedback store and what is built on it.

`store.FeedbackStore` is the store's front, over modules by job: `schema` (tables), `engine` (URL, engine,
sessions, retries), `migrations` (opening checks and upgrades), `reads`, `writes` (the one judgment-write path)
and `accounts`. `queue.AnnotationQueue` hands a round's items to people (leases, submissions, revisions,
progress) over the store's tables; `verdicts` turns the judgments the store holds (`FeedbackStore.judged_items`)
into what was accepted, for every trainer, the reward model and the exports; `agreement` and `figures` summarise
them.
"""
