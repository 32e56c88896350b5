"""The words of the simulated local-service market: cities, categories, cuisines, attributes, and the
many ways people type each of them. Canonical values here are the default schema's values."""

from __future__ import annotations

from querytune.catalog import DAYS, PRICE_LEVELS

# city -> (population weight, neighbourhoods, aliases people type)
CITIES: dict[str, tuple[float, list[str], list[str]]] = {
    "new york": (8.0, ["midtown", "soho", "harlem", "williamsburg", "astoria", "chelsea"], ["nyc", "ny", "new york city"]),
    "los angeles": (6.0, ["hollywood", "silver lake", "venice", "koreatown", "downtown"], ["la", "l.a."]),
    "chicago": (5.0, ["wicker park", "lincoln park", "the loop", "pilsen", "logan square"], ["chi", "chitown"]),
    "houston": (4.0, ["montrose", "the heights", "midtown", "downtown"], ["htx"]),
    "austin": (3.0, ["downtown", "east austin", "south congress", "hyde park", "zilker"], ["atx"]),
    "san francisco": (3.5, ["mission", "soma", "north beach", "castro", "sunset"], ["sf", "san fran"]),
    "seattle": (3.0, ["capitol hill", "ballard", "fremont", "downtown"], ["sea"]),
    "boston": (3.0, ["back bay", "south end", "north end", "jamaica plain", "fenway"], ["bos"]),
    "philadelphia": (3.0, ["center city", "fishtown", "old city", "university city"], ["philly"]),
    "washington dc": (3.0, ["georgetown", "dupont circle", "adams morgan", "navy yard"], ["dc", "washington"]),
    "miami": (3.0, ["wynwood", "little havana", "brickell", "south beach"], ["mia"]),
    "atlanta": (3.0, ["midtown", "buckhead", "old fourth ward", "decatur"], ["atl"]),
    "denver": (2.5, ["lodo", "rino", "capitol hill", "highlands"], ["den"]),
    "portland": (2.0, ["pearl district", "alberta", "hawthorne", "sellwood"], ["pdx"]),
    "nashville": (2.0, ["east nashville", "the gulch", "germantown", "midtown"], ["nash"]),
    "new orleans": (2.0, ["french quarter", "garden district", "marigny", "uptown"], ["nola"]),
    "las vegas": (2.5, ["the strip", "downtown", "summerlin", "henderson"], ["vegas", "lv"]),
    "san diego": (2.5, ["gaslamp", "north park", "la jolla", "pacific beach"], ["sd"]),
    "minneapolis": (2.0, ["northeast", "uptown", "north loop", "downtown"], ["mpls"]),
    "phoenix": (2.5, ["arcadia", "roosevelt row", "biltmore", "downtown"], ["phx"]),
    "dallas": (3.0, ["deep ellum", "uptown", "bishop arts", "downtown"], ["dfw"]),
    "detroit": (2.0, ["midtown", "corktown", "downtown", "eastern market"], ["det"]),
}

# category -> (vertical, catalog weight, hours profile, typical price levels, surfaces people type)
CATEGORIES: dict[str, tuple[str, float, str, tuple[int, ...], list[str]]] = {
    "restaurant": ("food", 30.0, "restaurant", (1, 2, 2, 3, 4), ["restaurant", "restaurants", "food", "place to eat", "dinner"]),
    "cafe": ("food", 5.0, "cafe", (1, 2), ["coffee", "coffee shop", "cafe", "espresso"]),
    "bakery": ("food", 2.5, "cafe", (1, 2), ["bakery", "bakeries", "pastries", "bread"]),
    "bar": ("food", 4.0, "bar", (2, 2, 3), ["bar", "bars", "drinks", "pub", "cocktail bar"]),
    "brewery": ("food", 1.5, "bar", (2,), ["brewery", "craft beer", "brewpub"]),
    "ice_cream_shop": ("food", 1.5, "late_day", (1, 2), ["ice cream", "gelato", "frozen yogurt"]),
    "food_truck": ("food", 1.5, "late_day", (1,), ["food truck", "food trucks"]),
    "juice_bar": ("food", 1.0, "cafe", (1, 2), ["juice bar", "smoothies", "smoothie place"]),
    "plumber": ("home", 2.0, "trade", (2, 3), ["plumber", "plumbers", "plumbing", "plumbing service"]),
    "electrician": ("home", 1.5, "trade", (2, 3), ["electrician", "electricians", "electrical repair"]),
    "locksmith": ("home", 1.2, "trade", (2,), ["locksmith", "locked out", "lock smith"]),
    "hvac": ("home", 1.2, "trade", (2, 3), ["hvac", "ac repair", "heating repair", "air conditioning repair"]),
    "roofer": ("home", 0.8, "trade", (2, 3), ["roofer", "roof repair", "roofing"]),
    "house_cleaning": ("home", 1.2, "trade", (1, 2), ["house cleaning", "maid service", "cleaners", "cleaning service"]),
    "pest_control": ("home", 0.8, "trade", (2,), ["pest control", "exterminator", "bed bug removal"]),
    "movers": ("home", 1.0, "trade", (2, 3), ["movers", "moving company", "moving help"]),
    "handyman": ("home", 1.0, "trade", (1, 2), ["handyman", "handy man", "odd jobs"]),
    "landscaper": ("home", 0.8, "trade", (2,), ["landscaper", "lawn care", "landscaping", "yard work"]),
    "dentist": ("health", 2.0, "clinic", (2, 3), ["dentist", "dentists", "dental office", "teeth cleaning"]),
    "pediatrician": ("health", 1.0, "clinic", (2, 3), ["pediatrician", "kids doctor", "childrens doctor"]),
    "urgent_care": ("health", 1.2, "urgent", (2,), ["urgent care", "walk in clinic", "urgent care clinic"]),
    "pharmacy": ("health", 1.5, "pharmacy", (1, 2), ["pharmacy", "drugstore", "drug store", "chemist"]),
    "optometrist": ("health", 0.8, "clinic", (2, 3), ["optometrist", "eye doctor", "eye exam"]),
    "chiropractor": ("health", 0.8, "clinic", (2, 3), ["chiropractor", "chiro", "back doctor"]),
    "physical_therapist": ("health", 0.8, "clinic", (2, 3), ["physical therapist", "physical therapy", "pt clinic"]),
    "dermatologist": ("health", 0.7, "clinic", (3,), ["dermatologist", "skin doctor", "derm"]),
    "hair_salon": ("beauty", 2.0, "salon", (2, 3), ["hair salon", "haircut", "salon", "hairdresser"]),
    "barber": ("beauty", 1.5, "salon", (1, 2), ["barber", "barbershop", "barber shop", "mens haircut"]),
    "nail_salon": ("beauty", 1.5, "salon", (1, 2), ["nail salon", "nails", "manicure", "mani pedi"]),
    "spa": ("beauty", 1.0, "salon", (3, 4), ["spa", "day spa", "facial"]),
    "massage": ("beauty", 1.0, "salon", (2, 3), ["massage", "massage therapist", "deep tissue massage"]),
    "tattoo_parlor": ("beauty", 0.7, "late_day", (2, 3), ["tattoo", "tattoo shop", "tattoo parlor"]),
    "auto_repair": ("auto", 2.0, "shop", (2, 3), ["auto repair", "mechanic", "car repair", "auto shop"]),
    "car_wash": ("auto", 1.0, "shop", (1,), ["car wash", "carwash", "car detailing"]),
    "tire_shop": ("auto", 0.8, "shop", (1, 2), ["tire shop", "tires", "flat tire repair"]),
    "gas_station": ("auto", 1.2, "gas", (1,), ["gas station", "gas", "fuel"]),
    "towing": ("auto", 0.6, "always", (2,), ["towing", "tow truck", "roadside assistance"]),
    "veterinarian": ("pets", 1.2, "clinic", (2, 3), ["vet", "veterinarian", "animal hospital"]),
    "pet_groomer": ("pets", 0.8, "salon", (2,), ["dog groomer", "pet grooming", "groomer"]),
    "dog_boarding": ("pets", 0.6, "shop", (2,), ["dog boarding", "doggy daycare", "pet sitter", "kennel"]),
    "pet_store": ("pets", 0.8, "shop", (1, 2), ["pet store", "pet supplies", "pet shop"]),
    "hotel": ("lodging", 2.0, "always", (2, 3, 4), ["hotel", "hotels", "place to stay"]),
    "motel": ("lodging", 0.8, "always", (1,), ["motel", "cheap motel", "roadside motel"]),
    "bed_and_breakfast": ("lodging", 0.6, "always", (2, 3), ["bed and breakfast", "b&b", "bnb", "inn"]),
    "movie_theater": ("fun", 1.0, "late_day", (2,), ["movie theater", "movies", "cinema"]),
    "bowling_alley": ("fun", 0.6, "late_day", (2,), ["bowling", "bowling alley"]),
    "escape_room": ("fun", 0.6, "late_day", (2, 3), ["escape room", "escape rooms", "escape game"]),
    "karaoke": ("fun", 0.6, "bar", (2,), ["karaoke", "karaoke bar", "ktv"]),
    "comedy_club": ("fun", 0.5, "bar", (2, 3), ["comedy club", "stand up comedy", "comedy show"]),
    "museum": ("fun", 0.8, "museum", (1, 2), ["museum", "museums", "art museum"]),
    "gym": ("fitness", 2.0, "gym", (1, 2, 3), ["gym", "gyms", "fitness center", "workout"]),
    "yoga_studio": ("fitness", 1.0, "gym", (2, 3), ["yoga", "yoga studio", "yoga class"]),
    "laundromat": ("errands", 1.0, "gym", (1,), ["laundromat", "laundry", "coin laundry"]),
    "dry_cleaner": ("errands", 0.8, "shop", (1, 2), ["dry cleaner", "dry cleaning", "alterations"]),
}

# cuisine -> (weight, surfaces, slang / abbreviations)
CUISINES: dict[str, tuple[float, list[str], list[str]]] = {
    "thai": (3.0, ["thai", "thai food"], ["pad thai"]),
    "mexican": (4.0, ["mexican", "mexican food"], ["tacos", "taqueria", "mex"]),
    "italian": (3.5, ["italian", "italian food"], ["pasta"]),
    "chinese": (3.5, ["chinese", "chinese food"], ["chinese takeout", "dim sum"]),
    "japanese": (2.0, ["japanese", "japanese food"], ["izakaya"]),
    "sushi": (2.5, ["sushi", "sushi bar"], ["sashimi", "omakase"]),
    "indian": (2.5, ["indian", "indian food"], ["curry", "tikka masala"]),
    "vietnamese": (1.5, ["vietnamese", "vietnamese food"], ["pho", "banh mi"]),
    "korean": (1.5, ["korean", "korean food"], ["kbbq", "korean bbq"]),
    "bbq": (2.0, ["bbq", "barbecue", "barbeque"], ["brisket", "smokehouse"]),
    "pizza": (4.0, ["pizza", "pizzeria"], ["za", "pizza joint", "slice"]),
    "burgers": (3.0, ["burgers", "burger"], ["burger joint", "smash burger"]),
    "mediterranean": (1.5, ["mediterranean", "mediterranean food"], ["falafel", "shawarma"]),
    "greek": (1.0, ["greek", "greek food"], ["gyro", "gyros"]),
    "french": (1.2, ["french", "french restaurant"], ["bistro", "brasserie"]),
    "american": (2.5, ["american", "american food"], ["diner", "comfort food"]),
    "seafood": (1.5, ["seafood", "fish restaurant"], ["oysters", "crab shack"]),
    "vegan": (1.2, ["vegan", "vegan food"], ["plant based", "vegan eats"]),
    "ramen": (1.2, ["ramen", "ramen shop"], ["noodle soup", "tonkotsu"]),
    "middle_eastern": (1.0, ["middle eastern", "middle eastern food"], ["kebab", "hummus"]),
    "brunch": (1.5, ["brunch", "breakfast"], ["bottomless mimosas", "pancakes"]),
}

# attribute -> (categories verticals it applies to, prevalence, surfaces, catalog phrase)
ATTRIBUTES: dict[str, tuple[tuple[str, ...], float, list[str], str]] = {
    "kid_friendly": (("food", "fun", "health", "beauty"), 0.35, ["kid friendly", "family friendly", "good for kids", "that takes kids", "for kids"], "kid friendly"),
    "outdoor_seating": (("food",), 0.3, ["outdoor seating", "with a patio", "patio", "outside seating", "rooftop"], "outdoor seating"),
    "delivery": (("food",), 0.4, ["delivery", "that delivers", "with delivery", "delivers"], "delivery available"),
    "vegan_options": (("food",), 0.3, ["vegan options", "vegan friendly", "with vegan options"], "vegan options"),
    "accepts_insurance": (("health", "pets"), 0.55, ["takes insurance", "accepts insurance", "in network", "that takes my insurance"], "accepts insurance"),
    "emergency_service": (("home", "health", "pets", "auto"), 0.3, ["emergency", "emergency service", "same day", "asap"], "emergency service"),
    "pet_friendly": (("food", "lodging", "errands"), 0.25, ["dog friendly", "pet friendly", "dogs allowed", "that allows dogs"], "pet friendly"),
    "wheelchair_accessible": (("food", "health", "fun", "lodging", "fitness"), 0.4, ["wheelchair accessible", "accessible", "handicap accessible"], "wheelchair accessible"),
    "free_wifi": (("food", "lodging", "errands"), 0.45, ["free wifi", "with wifi", "wifi"], "free wifi"),
    "walk_ins": (("beauty", "health", "auto"), 0.45, ["walk in", "walk ins welcome", "no appointment", "walk-in"], "walk-ins welcome"),
}

PRICES = {  # price slot value -> (catalog price levels, surfaces)
    "cheap": (PRICE_LEVELS["cheap"], ["cheap", "affordable", "budget", "inexpensive", "cheap eats", "not expensive"]),
    "moderate": (PRICE_LEVELS["moderate"], ["moderately priced", "mid priced", "reasonably priced", "mid range"]),
    "expensive": (PRICE_LEVELS["expensive"], ["upscale", "fancy", "high end", "fine dining", "luxury", "splurge"]),
    "affordable": (PRICE_LEVELS["affordable"], ["cheap", "affordable", "inexpensive", "cheap eats", "not expensive"]),  # world v2's needs only
}
PRICE_WORDS = {1: "budget-friendly", 2: "moderately priced", 3: "upscale", 4: "luxury"}

OPEN = {  # open slot value -> surfaces
    "now": ["open now", "open rn", "currently open", "thats open now", "open right now"],
    "late": ["open late", "late night", "open after midnight", "late", "open til 2"],
    "24h": ["24 hour", "24/7", "24h", "open 24 hours", "all night"],
}
DAY_SURFACES = {d: [d, f"on {d}", d[:3]] for d in DAYS} | {
    "today": ["today", "for today"],
    "tomorrow": ["tomorrow", "tmrw", "for tomorrow"],
    "weekend": ["this weekend", "on the weekend", "weekend", "sat or sun"],
}
RATING = {4.5: ["best", "top rated", "highest rated", "best rated", "really good"], 4.0: ["good", "highly rated", "4+ stars", "well reviewed", "decent"]}
NEAR_ME = ["near me", "nearby", "close by", "around me", "near here", "close to me", "nearest"]

# Named-business name parts by vertical
NAME_PARTS = {
    "food": (["golden", "little", "blue", "red", "happy", "lucky", "old town", "corner", "urban", "sunny", "rustic", "royal", "silver", "green", "smoky", "spicy", "hungry", "copper", "wild", "stone"],
             ["dragon", "garden", "table", "kitchen", "spoon", "fork", "oven", "lantern", "orchid", "pepper", "leaf", "bowl", "harbor", "fig", "olive", "tiger", "moon", "owl", "bean", "barrel"]),
    "home": (["quick", "reliable", "ace", "pro", "all star", "precision", "honest", "city", "a1", "superior", "budget", "elite", "first call", "top notch", "handy"],
             ["fix", "works", "solutions", "services", "crew", "experts", "masters", "team", "pros", "brothers"]),
    "health": (["bright", "family", "gentle", "city", "pure", "clear", "harmony", "summit", "evergreen", "riverside", "premier", "caring", "wellness", "north star"],
               ["smile", "care", "health", "clinic", "medical", "vision", "wellness", "family practice", "associates", "center"]),
    "beauty": (["glow", "luxe", "velvet", "polished", "sharp", "classic", "bella", "urban", "serene", "fresh", "golden", "modern"],
               ["studio", "lounge", "cuts", "beauty", "bar", "parlor", "house", "collective", "room", "spa"]),
    "auto": (["speedy", "precision", "honest", "main street", "express", "pro", "ace", "route 66", "city", "reliable"],
             ["auto", "motors", "garage", "auto care", "tire", "service center", "car care", "wash"]),
    "pets": (["happy", "furry", "wagging", "pawsome", "loyal", "gentle", "city", "good boy"],
             ["paws", "tails", "pets", "animal clinic", "vet", "pet care", "pup spa", "critters"]),
    "lodging": (["grand", "harbor", "park", "city center", "the royal", "riverside", "maple", "station", "sunset", "old mill"],
                ["inn", "hotel", "suites", "lodge", "house", "motor inn", "stay"]),
    "fun": (["galaxy", "lucky", "midnight", "big top", "starlight", "laugh", "retro", "neon", "grand", "city"],
            ["lanes", "cinema", "factory", "room", "lounge", "club", "theater", "hall", "arcade"]),
    "fitness": (["iron", "core", "peak", "flow", "zen", "power", "om", "urban", "fit", "summit"],
                ["fitness", "gym", "yoga", "athletic club", "studio", "strength", "barbell"]),
    "errands": (["sparkle", "clean", "fresh", "spin", "bubble", "city", "quick", "press"],
                ["laundry", "cleaners", "wash", "spin", "dry cleaning", "laundromat"]),
}

# Non-local queries the log also carries (intent out_of_scope); some share words with local ones.
OUT_OF_SCOPE = [
    "weather {day}", "weather in {city}", "how to fix a leaky faucet", "how to unclog a drain", "recipe for {cuisine_word}",
    "{cuisine_word} recipe easy", "how to cut your own hair", "diy {cat_word} tips", "lyrics {song}", "{song} lyrics",
    "convert {n} miles to km", "{n} usd to eur", "who won the game last night", "how tall is {person}",
    "{person} net worth", "is {cuisine_word} healthy", "calories in {cuisine_word}", "translate hello to spanish",
    "what time is it in {city}", "flights to {city}", "history of {city}", "how to become a {cat_word}",
    "{cat_word} salary", "best {cat_word} memes", "python list comprehension", "how many ounces in a cup",
    "symptoms of flu", "how to tie a tie", "population of {city}", "{person} movies", "news today",
]
SONGS = ["bohemian rhapsody", "hotel california", "shallow", "bad guy", "levitating", "hey jude", "purple rain", "wonderwall"]
PEOPLE = ["taylor swift", "lebron james", "tom hanks", "beyonce", "elon musk", "serena williams", "keanu reeves", "zendaya"]
